from unimodality.cli import main

main()
