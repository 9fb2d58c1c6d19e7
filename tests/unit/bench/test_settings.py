import argparse

import pytest

from bench import settings


def parse(*argv: str) -> settings.Settings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return settings.from_arguments(parser.parse_args(argv))


def test_presets_and_overrides() -> None:
    assert parse() == settings.FULL
    assert parse("--quick") == settings.QUICK
    chosen = parse("--quick", "--reps", "2", "--idle-steps", "500,100,500", "--bulk-seconds", "3")
    assert (chosen.reps, chosen.idle_steps, chosen.bulk_seconds, chosen.quick) == (
        2, (100, 500), 3, True,
    )  # fmt: skip


def test_bad_values_are_refused_with_the_flag_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--idle-steps", "ten")
    assert "--idle-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--bulk-seconds"):
        parse("--bulk-seconds", "0")  # iperf3 -t 0 would never end


def test_sections_select_parts_of_a_run_and_unknown_ones_are_refused() -> None:
    assert parse().runs("idle") and parse().runs("upgrade") and parse().runs("grpc")
    http_only = parse("--quick", "--sections", "http")
    assert http_only.runs("http") and not http_only.runs("tcp") and not http_only.runs("idle")
    with pytest.raises(SystemExit, match="--sections"):
        parse("--sections", "http,websocket")
