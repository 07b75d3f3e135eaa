from rsna_utils.cli import main

raise SystemExit(main())
