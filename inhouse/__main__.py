from inhouse.cli.main import main

raise SystemExit(main())
