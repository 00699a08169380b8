from distill.cli import console

raise SystemExit(console())
