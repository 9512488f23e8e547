"""The zoo report's family-weighted estimate: each family's unchecked models extrapolated at the
family's checked pass rate, families with nothing checked counted as failing."""
import timm

from model_zoo_checks import lists
from model_zoo_checks.report import family_estimate


def _family(family, prefix, k):
    names = [n for n in timm.list_models(prefix) if lists.family_of(n, lists.module_of(n)) == family]
    assert len(names) >= k, (family, names)
    return names[:k]


def test_family_estimate_extrapolates_each_family_at_its_checked_rate():
    vit = _family("vision_transformer", "vit_*", 6)          # 1 pass, 1 fail, 1 skipped, 3 not run -> 1 + 4 * 1/2 = 3
    deit = _family("deit", "deit*", 3)        # 2 pass, 1 not run -> 2 + 1 * 1 = 3
    cait = _family("cait", "cait*", 2)        # nothing checked -> 0
    records = {vit[0]: {"status": "pass"}, vit[1]: {"status": "fail"}, vit[2]: {"status": "skipped"},
               deit[0]: {"status": "pass"}, deit[1]: {"status": "pass"}, cait[0]: {"status": "skipped"}}
    assert family_estimate(vit + deit + cait, records) == 6.0
    assert family_estimate(vit, {}) == 0.0


def test_runs_section_names_each_run_by_its_records():
    """REPORT.md's runs are read from the records' own run stamps (``--report-only`` used to repeat
    the last run of each group for records that other runs produced)."""
    from model_zoo_checks.report import _runs_section
    vit = _family("vision_transformer", "vit_*", 3)
    a = {"command": "python -m model_zoo_checks --models-file small.txt", "started": "2026-11-27 23:35"}
    b = {"command": "python -m model_zoo_checks --retry-failed", "started": "2026-11-28 01:00"}
    records = {vit[0]: {"status": "pass", "run": a, "fingerprint": "f1"},
               vit[1]: {"status": "fail", "run": b, "fingerprint": "f2"},
               vit[2]: {"status": "pass", "fingerprint": "f0"},
               "resnet50": {"status": "pass", "run": a, "fingerprint": "f1"}}
    M = {"groups": {"transformer": {"command": "python -m model_zoo_checks --all --groups transformer",
                                    "generated": "2026-11-27 19:01"},
                    "cnn": {"command": "python -m model_zoo_checks --all", "generated": "2026-11-26 10:00"}}}
    lines = []
    _runs_section(lines.append, records, M)
    text = "\n".join(lines)
    assert f"- Run `{a['command']}` ({a['started']}, fingerprint `f1`): cnn 1, transformer 1" in text
    assert f"`{b['command']}` ({b['started']}, fingerprint `f2`): transformer 1" in text
    assert "transformer 1 records with fingerprint `f0` from runs before" in text
    # the unstamped record is a transformer: only that group's last recorded run is named for it
    assert "--groups transformer" in text and "`python -m model_zoo_checks --all` (" not in text
