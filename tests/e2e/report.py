"""Per-workflow times of the e2e run, printed in pytest's terminal summary (tests/e2e/conftest.py)."""
TIMES = {}  # workflow name -> {"load": s, "convert": s, "run": s, ...}
NOTES = []  # other lines: model files built, server start


def lines():
    return NOTES + [f"{name}: " + ", ".join(f"{key} {value:.1f} s" if isinstance(value, float) else f"{key} {value}"
                                    for key, value in times.items())
            for name, times in TIMES.items()]
