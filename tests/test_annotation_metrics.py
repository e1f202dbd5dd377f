"""Classification metrics (epiflow.metrics.classification) on inputs with known answers."""

import numpy as np
import pytest

from epiflow.errors import EpiflowError
from epiflow.metrics.classification import classification_scores, confusion_table


def test_perfect_and_known_scores():
    s = classification_scores(["a", "b", "c"], ["a", "b", "c"])
    assert s == {"accuracy": 1.0, "macro_F1": 1.0, "micro_F1": 1.0, "weighted_F1": 1.0, "balanced_accuracy": 1.0}
    # true a a a b, predicted a a b b: a: P 1, R 2/3, F1 0.8; b: P 1/2, R 1, F1 2/3
    s = classification_scores(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["micro_F1"] == pytest.approx(0.75)
    assert s["macro_F1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert s["weighted_F1"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)


def test_predicted_class_absent_from_truth_counts_in_macro_f1():
    # 'x' is never true: macro F1 averages a: F1 = 2*1*0.5/1.5 = 2/3 and x: 0
    s = classification_scores(["a", "a"], ["a", "x"])
    assert s["macro_F1"] == pytest.approx(1 / 3)
    assert s["balanced_accuracy"] == pytest.approx(0.5)  # recall over true labels only


def test_confusion_table_counts_and_normalised():
    t = ["a", "a", "b", "b", "b"]
    p = ["a", "b", "b", "b", "a"]
    c = confusion_table(t, p)
    assert list(c.index) == ["a", "b"] and list(c.columns) == ["a", "b"]
    assert c.to_numpy().tolist() == [[1, 1], [1, 2]]
    n = confusion_table(t, p, labels=["a", "b", "z"], normalize="true")
    np.testing.assert_allclose(n.to_numpy(), [[0.5, 0.5, 0], [1 / 3, 2 / 3, 0], [0, 0, 0]])
    col = confusion_table(t, p, normalize="pred")
    np.testing.assert_allclose(col.to_numpy().sum(axis=0), [1, 1])


def test_bad_inputs():
    with pytest.raises(EpiflowError):
        classification_scores(["a"], ["a", "b"])
    with pytest.raises(EpiflowError):
        classification_scores([], [])
    with pytest.raises(EpiflowError):
        confusion_table(["a"], ["a"], normalize="all")
