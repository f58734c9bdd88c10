"""What the tests, the benchmarks and the examples share, and Graft itself does not ship: the
digits data and models made from it (``digits``), simulated features for the gate's benchmarks
(``features``), private Redis and PostgreSQL servers on free ports (``services``, ``net``),
and the README's failure table with a client that polls through each fault (``faults``).

Imports go one way: tests, bench and examples use ``devkit``; ``devkit`` uses Graft's engine
and nothing of the tests."""
