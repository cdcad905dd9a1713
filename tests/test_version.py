import pytest

from omuscd import version


@pytest.mark.parametrize("release,expected", [
    ("1a0", "1.0a0"), ("2b3", "2.0b3"), ("1d7", "1.0.dev7"), ("3r2", "3.2"), ("3v2", "3.2.post0"),
])
def test_release_maps_to_pep440(release, expected):
    assert version.pep440(release) == expected


@pytest.mark.parametrize("bad", ["1", "1x0", "a1", "1a", "", "1.0a0"])
def test_bad_release_strings_are_refused(bad):
    with pytest.raises(ValueError):
        version.parse_release(bad)


def test_package_version_is_derived_from_the_release():
    assert version.__version__ == version.pep440(version.RELEASE)
    assert version.VERSION_STRING == f"omuscd-{version.RELEASE}"
    assert version.PROTOCOL_VERSION == version.parse_release(version.RELEASE)[0]
