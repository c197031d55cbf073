from qpu_gateway.cli import main

raise SystemExit(main())
