"""Regenerate metrics_cases.json: expected values from sklearn roc_auc_score per class and by hand.

Independent of analysis.metrics on purpose (the module is tested against these cases).
Run: python tests/data/make_metrics_cases.py
"""
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

cases = []
def add(name, y, p, note):
    y = np.array(y); p = np.array(p, float)
    assert np.allclose(p.sum(1), 1)
    per = []
    for k in range(4):
        if 0 < (y == k).sum() < len(y):
            per.append(float(roc_auc_score((y == k).astype(int), p[:, k])))
        else:
            per.append(None)
    vals = [v for v in per if v is not None]
    cases.append({"name": name, "note": note, "y_true": y.tolist(), "y_prob": p.tolist(),
                  "expected": {"auc_per_class": per, "macro_auc": float(np.mean(vals)) if vals else None,
                               "accuracy": float(np.mean(p.argmax(1) == y))}})
    return per
# hand case
y = [0, 1, 2, 3, 0, 1]
p = [[0.7, 0.1, 0.1, 0.1],
     [0.2, 0.5, 0.2, 0.1],
     [0.1, 0.2, 0.6, 0.1],
     [0.3, 0.1, 0.2, 0.4],
     [0.25, 0.32, 0.3, 0.13],
     [0.1, 0.2, 0.65, 0.05]]
note = ("by hand: class 0 positives {0.7,0.25} vs negatives {0.2,0.1,0.3,0.1}: 0.7 beats 4, 0.25 beats 3 -> 7/8;"
        " class 1 positives {0.5,0.2} vs {0.1,0.2,0.1,0.32}: 0.5 beats all 4, 0.2 beats 2, ties 1 -> 2.5; 6.5/8;"
        " class 2 positive {0.6} vs {0.1,0.2,0.2,0.3,0.65}: beats 4 -> 4/5;"
        " class 3 positive {0.4} vs {0.1,0.1,0.1,0.13,0.05}: 5/5; macro (0.875+0.8125+0.8+1)/4=0.871875;"
        " argmax [0,1,2,3,1,2] -> correct 0,1,2,3 -> 4/6")
per = add("hand_tiny", y, p, note)
assert per == [0.875, 0.8125, 0.8, 1.0], per
# perfect
y = [0, 0, 1, 1, 2, 2, 3, 3]
p = [[0.7 if k == c else 0.1 for k in range(4)] for c in y]
add("perfect", y, p, "true class scored 0.7, others 0.1: every AUC 1, accuracy 1")
# absent class 3
rng = np.random.default_rng(5)
y = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
raw = rng.random((10, 4)); raw[:, 3] *= 0.2
p = np.round(raw / raw.sum(1, keepdims=True), 6); p[:, 3] = 1 - p[:, :3].sum(1)
add("absent_class_3", y, p.tolist(), "no patient of class 3: its AUC is null and the macro averages classes 0-2 only")
# ties
y = [0, 1, 2, 3, 0, 1, 2, 3]
p = [[0.4, 0.2, 0.2, 0.2],
     [0.4, 0.3, 0.2, 0.1],
     [0.1, 0.3, 0.4, 0.2],
     [0.1, 0.3, 0.2, 0.4],
     [0.45, 0.1, 0.1, 0.35],
     [0.2, 0.3, 0.3 - 0.0001, 0.2001],
     [0.1, 0.2, 0.4, 0.3],
     [0.2, 0.2, 0.2, 0.4]]
add("ties", y, p, "many tied scores within each class column: a tie between a positive and a negative counts 1/2")
# single positive present for class 0 and all other classes; class 1 absent and class 2 only one
y = [2, 3, 3, 3, 0, 0]
p = [[0.1, 0.1, 0.5, 0.3], [0.1, 0.1, 0.2, 0.6], [0.3, 0.1, 0.1, 0.5], [0.2, 0.1, 0.4, 0.3],
     [0.6, 0.2, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25 + 0.0]]
add("absent_class_1_argmax_tie", y, p, "class 1 absent (null); last row ties all four: argmax takes the first (class 0)")
Path(__file__).with_name("metrics_cases.json").write_text(json.dumps(cases, indent=1))
for c in cases: print(c["name"], c["expected"])
