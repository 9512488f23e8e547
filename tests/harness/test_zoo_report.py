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
