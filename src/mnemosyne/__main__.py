from mnemosyne.cli import main

raise SystemExit(main())
