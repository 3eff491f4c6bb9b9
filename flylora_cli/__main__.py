from flylora_cli.main import main

raise SystemExit(main())
