from qpu_gateway.ops.cli import main

raise SystemExit(main())
