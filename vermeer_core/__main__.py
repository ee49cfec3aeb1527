from vermeer_core.cli import main

raise SystemExit(main())
