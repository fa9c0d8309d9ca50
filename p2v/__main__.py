from p2v.cli.main import main

main()
