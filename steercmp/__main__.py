from steercmp.cli import main

raise SystemExit(main())
