from trainables.evaluate import exact_match, normalize


def test_normalize():
    assert normalize("  The Red.") == "red"
    assert normalize("top  left!") == "top left"
    assert exact_match("A circle", "circle")
    assert not exact_match("circles", "circle")
    assert not exact_match("", "red")
