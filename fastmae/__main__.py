from fastmae.cli import main

raise SystemExit(main())
