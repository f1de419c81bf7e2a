from cxrelay.app.cli import main

main()
