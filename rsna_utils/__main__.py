from rsna_utils.app.cli import main

raise SystemExit(main())
