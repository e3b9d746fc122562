import numpy as np
import pytest

from copycat_tf.evaluation import metrics


def test_confusion_matrix_and_scores_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 0]
    result = metrics.classification_metrics(y_true, y_pred, 3)
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    assert result["accuracy"] == pytest.approx(3 / 6)
    # class 0: P=1/3 R=1/2 F1=0.4; class 1: P=2/3 R=1 F1=0.8; class 2 never predicted: F1=0
    np.testing.assert_allclose(result["per_class"]["f1"], [0.4, 0.8, 0.0])
    assert result["macro_f1"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)


def test_macro_f1_ignores_classes_absent_from_truth_and_predictions():
    result = metrics.classification_metrics([0, 1], [0, 1], 5)
    assert result["macro_f1"] == pytest.approx(1.0)
    assert result["per_class"]["support"] == [1, 1, 0, 0, 0]


def test_labels_out_of_range():
    with pytest.raises(ValueError, match="outside 0..2"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)
