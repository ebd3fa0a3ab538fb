from lxd_daemon.cli import main

raise SystemExit(main())
