"""KOALA Edge benchmarks (`koala bench NAME|all`). Each module exposes `run(quick, out) -> dict`.

Every benchmark measures its own baseline in the same run and reports ratios against it, because
the development machines are shared and absolute numbers drift with load.
"""
