from pathlib import Path

import pytest
import yaml

from kms_pipelines.core.foundation.policy import CLAUSE_IDS, DEFAULT_POLICY_PATH, PolicyError, load_policy, parse_policy


def _policy_dict():
    return yaml.safe_load(DEFAULT_POLICY_PATH.read_text())


def test_packaged_policy_carries_the_policy_numbers():
    p = load_policy()
    assert p.key_class("root").rotation_days == 90
    assert p.key_class("service").rotation_days == 60
    assert p.key_class("data").rotation_days == 180
    assert p.key_class("break-glass").rotation_days == 30
    assert p.key_class("root").retention_days == 365 and p.key_class("service").retention_days == 365
    assert p.key_class("root").partner_notice_hours == 24
    assert p.access.workload_token_ttl_minutes == 15
    assert sorted(p.access.roles) == ["compliance_officer", "security_engineering", "sre_oncall"]
    assert p.backup.keep_nightly == 7 and p.backup.keep_weekly_days == 90
    assert p.drills.remediation_business_days == 5
    assert p.console.session_idle_minutes == 15 and p.console.session_absolute_hours == 8
    assert set(p.key_class("service").rotate_immediately_on) == {"compromise", "tenant-rotation", "ci-secret-exposure"}


def test_every_key_class_names_known_clauses():
    p = load_policy()
    for name in ("root", "service", "data", "export", "backup", "break-glass"):
        assert set(p.key_class(name).clauses) <= set(CLAUSE_IDS)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["key_classes"]["root"].__setitem__("rotation_days", 0), "key_classes.root.rotation_days"),
        (
            lambda d: d["key_classes"]["service"].__setitem__("rotation_days", "sixty"),
            "key_classes.service.rotation_days",
        ),
        (lambda d: d["access"].__setitem__("workload_token_ttl_minutes", 16), "access.workload_token_ttl_minutes"),
        (lambda d: d["access"].__setitem__("approvals_required", 1), "access.approvals_required"),
        (lambda d: d["backup"].pop("keep_nightly"), "backup.keep_nightly"),
        (lambda d: d["key_classes"]["root"].__setitem__("rotaton_days", 90), "key_classes.root.rotaton_days"),
        (lambda d: d["partners"][0].__setitem__("email", "not-an-email"), "partners.0.email"),
        (lambda d: d["access"]["permissions"].__setitem__("rotate", ["janitor"]), "access"),
        (lambda d: d["console"].__setitem__("session_idle_minutes", 0), "console.session_idle_minutes"),
        (lambda d: d["console"].__setitem__("session_absolute_hours", 48), "console.session_absolute_hours"),
        (lambda d: d["console"]["pages"].__setitem__("dagster", ["janitor"]), "pages.dagster: unknown roles"),
        (lambda d: d["console"]["pages"].pop("approvals"), "pages missing ['approvals']"),
    ],
)
def test_invalid_policy_is_refused_naming_the_field(mutate, field):
    data = _policy_dict()
    mutate(data)
    with pytest.raises(PolicyError) as err:
        parse_policy(yaml.safe_dump(data), "bad.yaml")
    assert field in str(err.value)
    assert str(err.value).startswith("bad.yaml: ")


def test_not_yaml_and_missing_file(tmp_path: Path):
    with pytest.raises(PolicyError, match="not valid YAML"):
        parse_policy("key_classes: [unclosed", "x.yaml")
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "missing.yaml")
