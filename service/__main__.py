"""`python -m service …` behaves as `resnet-serve …`."""

from service.cli import main

raise SystemExit(main())
