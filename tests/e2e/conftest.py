from e2e import report


def pytest_terminal_summary(terminalreporter):
    if report.TIMES or report.NOTES:
        terminalreporter.section("attention-edit e2e: times")
        for line in report.lines():
            terminalreporter.write_line(line)
