"""Shortcut audit (`shortcuts`: which words predict refuse vs comply in a dataset) and attack search
(`search`: logit score and search; `attack`: `mirage attack`; `summary`: the demo's section; `plots`)."""
