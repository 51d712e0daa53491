"""ferry.api.sizes: the slug table and resources_for."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from ferry.api.sizes import SIZES, Resources, resources_for

ROOT = pathlib.Path(__file__).resolve().parents[2]

# docs/architecture.md, "Size slugs (cpu / memory MiB / disk GiB)"
DOC_TABLE = {
    "s-1vcpu-512mb-10gb": (1, 512, 10),
    "s-1vcpu-1gb": (1, 1024, 25),
    "s-1vcpu-2gb": (1, 2048, 50),
    "s-2vcpu-2gb": (2, 2048, 60),
    "s-2vcpu-4gb": (2, 4096, 80),
    "s-4vcpu-8gb": (4, 8192, 160),
    "s-8vcpu-16gb": (8, 16384, 320),
}


@pytest.mark.parametrize("slug, expected", DOC_TABLE.items())
def test_slugs_match_the_documented_table(slug, expected):
    assert resources_for(slug, None) == Resources(*expected)


def test_table_has_exactly_the_documented_slugs():
    assert set(SIZES) == set(DOC_TABLE)


def test_crd_enum_matches_the_table():
    crd = yaml.safe_load((ROOT / "crds" / "droplets.ferry.dev.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(props["size"]["enum"]) == set(SIZES)


def test_explicit_resources():
    assert resources_for(None, {"cpu": 3, "memoryMiB": 3072, "diskGiB": 40}) == Resources(3, 3072, 40)


@pytest.mark.parametrize(
    "size, resources, message",
    [
        ("s-2vcpu-4gb", {"cpu": 1, "memoryMiB": 512, "diskGiB": 1}, "exactly one of spec.size or spec.resources, not both"),
        (None, None, "set exactly one of spec.size"),
        ("s-3vcpu-9gb", None, "unknown size 's-3vcpu-9gb'; known sizes: s-1vcpu-512mb-10gb, s-1vcpu-1gb"),
        (42, None, "must be a string slug"),
        (None, {"cpu": 1, "memoryMiB": 512}, "spec.resources is missing diskGiB"),
        (None, {"cpu": True, "memoryMiB": 512, "diskGiB": 1}, "spec.resources.cpu must be an integer, got True"),
        (None, {"cpu": 1.5, "memoryMiB": 512, "diskGiB": 1}, "spec.resources.cpu must be an integer"),
        (None, {"cpu": "2", "memoryMiB": 512, "diskGiB": 1}, "spec.resources.cpu must be an integer, got '2'"),
        (None, {"cpu": 0, "memoryMiB": 512, "diskGiB": 1}, "spec.resources.cpu must be at least 1, got 0"),
        (None, {"cpu": 257, "memoryMiB": 512, "diskGiB": 1}, "spec.resources.cpu must be at most 256, got 257"),
        (None, {"cpu": 1, "memoryMiB": 63, "diskGiB": 1}, "spec.resources.memoryMiB must be at least 64, got 63"),
        (None, {"cpu": 1, "memoryMiB": 64, "diskGiB": 0}, "spec.resources.diskGiB must be at least 1, got 0"),
        (None, {"cpu": 1, "memoryMiB": 64, "diskGiB": -3}, "must not be negative"),
        (None, [1, 2, 3], "must be an object"),
    ],
)
def test_errors_say_what_to_fix(size, resources, message):
    with pytest.raises(ValueError) as e:
        resources_for(size, resources)
    assert message in str(e.value)


def test_resources_arithmetic_and_api_shape():
    a, b = Resources(2, 4096, 80), Resources(1, 1024, 20)
    assert a + b == Resources(3, 5120, 100)
    assert a - b == Resources(1, 3072, 60)
    assert b.fits_in(a) and not a.fits_in(b)
    assert a.to_dict() == {"cpu": 2, "memoryMiB": 4096, "diskGiB": 80}
    assert Resources.from_dict(a.to_dict()) == a
    assert Resources(1, 2048, 10).image_gib == 12.0
