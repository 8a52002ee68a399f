"""The activation predictor on synthetic data from a random low-rank teacher (fast, offline)."""
from __future__ import annotations

import numpy as np
import pytest

from ripple_gguf.offline.predictor import Predictor, metrics, train, tune_threshold

N_EMBD, N_FF = 48, 200


def teacher_data(n_tokens: int, seed: int = 1, active: float = 0.2):
    """X (n, N_EMBD) float16 and Y = relu(X A) B > t, t chosen so that ~``active`` of pairs are on."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N_EMBD, 16)).astype(np.float32)
    B = rng.standard_normal((16, N_FF)).astype(np.float32)
    X = (rng.standard_normal((n_tokens, N_EMBD)) * 0.3 + 0.1).astype(np.float16)
    s = np.maximum(X.astype(np.float32) @ A, 0) @ B
    return X, s > np.quantile(s, 1 - active)


@pytest.fixture(scope="module")
def data():
    X, Y = teacher_data(3000)
    return X[:2400], Y[:2400], X[2400:], Y[2400:]


@pytest.fixture(scope="module")
def trained(data):
    X, Y, _, _ = data
    return train(X, Y, rank=32, recall_target=0.9, seed=3, epochs=15, batch=64)


def test_learns_teacher(trained, data):
    pred, m = trained
    _, _, X_test, Y_test = data
    base = Y_test.mean()
    got = metrics(pred.predict(X_test), Y_test)
    assert got["recall"] >= 0.87  # the target (0.9) holds on the validation split; unseen tokens scatter around it
    assert got["precision"] > 2.5 * base
    assert m["train_loss_last"] < m["train_loss_first"]
    assert abs(got["true_fraction"] - base) < 1e-12


def test_threshold_meets_recall_target_on_validation(trained, data):
    pred, m = trained
    X, Y, _, _ = data
    X_val, Y_val = X[-240:], Y[-240:]  # the default split holds out the last 10%
    assert m["n_val"] == 240
    got = metrics(pred.predict(X_val), Y_val)
    assert got["recall"] >= 0.9
    assert got["recall"] == pytest.approx(m["val_recall"])
    # the smallest such set: one step higher threshold would miss the target
    pos = np.sort(pred.logits(X_val)[Y_val])[::-1]
    k = int(np.ceil(0.9 * pos.size))
    assert (pos > pred.threshold).sum() == k or pos[k - 1] == pos[k]


def test_deterministic(data):
    X, Y, _, _ = data
    a, ma = train(X, Y, rank=8, seed=7, epochs=2)
    b, mb = train(X, Y, rank=8, seed=7, epochs=2)
    c, _ = train(X, Y, rank=8, seed=8, epochs=2)
    assert a.to_bytes() == b.to_bytes()
    assert ma["val_recall"] == mb["val_recall"]
    assert a.to_bytes() != c.to_bytes()


def test_explicit_validation_set(data):
    X, Y, X_test, Y_test = data
    pred, m = train(X, Y, rank=8, epochs=3, recall_target=0.8, X_val=X_test, Y_val=Y_test)
    assert m["n_val"] == len(X_test) and m["n_train"] == len(X)
    assert metrics(pred.predict(X_test), Y_test)["recall"] >= 0.8


def test_bytes_round_trip(trained, data):
    pred, m = trained
    _, _, X_test, Y_test = data
    blob = pred.to_bytes()
    assert len(blob) % 64 == 0 and len(blob) == pred.nbytes()
    assert blob[:4] == b"RPRD"
    back = Predictor.from_bytes(blob, N_EMBD, N_FF)
    assert back.rank == pred.rank and back.threshold == pred.threshold
    for name in ("x_shift", "x_scale", "W1", "b1", "W2", "b2"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pred, name))  # weights are f16 already
    np.testing.assert_array_equal(back.predict(X_test), pred.predict(X_test))
    assert back.to_bytes() == blob
    # the float32 weights before rounding give the same validation metrics within noise
    assert abs(m["val_f32_recall"] - m["val_recall"]) < 0.01
    assert abs(m["val_f32_over_prediction"] - m["val_over_prediction"]) < 0.02


def test_layout_is_what_the_docstring_says(trained):
    pred, _ = trained
    blob = pred.to_bytes()
    r, e, f = pred.rank, N_EMBD, N_FF
    pad = lambda n: (n + 63) // 64 * 64
    assert np.frombuffer(blob, "<u4", 1, 4)[0] == 2  # version
    shift = np.frombuffer(blob, "<f4", e, 64)
    o_sc = 64 + pad(4 * e)
    scale = np.frombuffer(blob, "<f4", e, o_sc)
    o_w1 = o_sc + pad(4 * e)
    w1t = np.frombuffer(blob, "<f2", r * e, o_w1).reshape(r, e)
    o_b1 = o_w1 + pad(2 * r * e)
    o_w2 = o_b1 + pad(4 * r)
    o_b2 = o_w2 + pad(2 * f * r)
    w2t = np.frombuffer(blob, "<f2", f * r, o_w2).reshape(f, r)
    x = np.linspace(-1, 1, e, dtype=np.float32)
    h = np.maximum(w1t.astype(np.float32) @ ((x - shift) * scale) + np.frombuffer(blob, "<f4", r, o_b1), 0)
    logits = w2t.astype(np.float32) @ h + np.frombuffer(blob, "<f4", f, o_b2)
    np.testing.assert_allclose(logits, pred.logits(x[None])[0], rtol=1e-5, atol=1e-5)
    assert len(blob) == o_b2 + pad(4 * f)


def test_packed_bits_accepted(data):
    X, Y, _, _ = data
    a, _ = train(X, Y, rank=8, epochs=2)
    b, _ = train(X, np.packbits(Y, axis=1), n_ff=N_FF, rank=8, epochs=2)
    assert a.to_bytes() == b.to_bytes()


def test_metrics():
    t = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    p = np.array([[1, 0, 1, 1], [1, 0, 0, 1]], bool)
    m = metrics(p, t)
    assert m == dict(recall=2 / 3, precision=2 / 5, over_prediction=5 / 3, predicted_fraction=5 / 8,
                     true_fraction=3 / 8)


def test_tune_threshold_exact():
    logits = np.array([[3.0, 2.0, 1.0, 0.0, -1.0]], np.float32)
    true = np.array([[True, False, True, True, False]])
    thr = tune_threshold(logits, true, 2 / 3)
    assert 0.0 < thr < 1.0  # two of the three actives (3.0, 1.0) need logits > thr
    assert tune_threshold(logits, true, 1.0) < 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(recall_target=0.0), "recall_target"),
    (dict(recall_target=1.5), "recall_target"),
    (dict(rank=0), "rank"),
    (dict(val_fraction=1.0), "val_fraction"),
])
def test_bad_arguments(data, kwargs, message):
    X, Y, _, _ = data
    with pytest.raises(ValueError, match=message):
        train(X, Y, **{"rank": 4, "epochs": 1, **kwargs})


def test_bad_inputs(data):
    X, Y, _, _ = data
    with pytest.raises(ValueError, match="X has 2400 tokens, Y has 2399"):
        train(X, Y[:-1], rank=4)
    with pytest.raises(ValueError, match="non-empty"):
        train(X[:0], Y[:0], rank=4)
    with pytest.raises(ValueError, match="packed mask"):
        train(X, np.packbits(Y, axis=1), n_ff=N_FF + 8, rank=4)
    with pytest.raises(ValueError, match="bool mask"):
        train(X, Y.astype(np.uint8), rank=4)
    with pytest.raises(ValueError, match="X_val"):
        train(X, Y, rank=4, X_val=X[:10])
    with pytest.raises(ValueError, match="n_embd"):
        train(X, Y, rank=4, X_val=X[:10, :-1], Y_val=Y[:10])
    with pytest.raises(ValueError, match="inf or nan"):
        train(np.full_like(X, np.nan), Y, rank=4)
    with pytest.raises(ValueError, match="too few"):
        train(X[:3], Y[:3], rank=4)
    pred, _ = train(X, Y, rank=4, epochs=1)
    with pytest.raises(ValueError, match="differ"):
        metrics(pred.predict(X), Y[:, :-1])
    with pytest.raises(ValueError, match="n_embd"):
        pred.predict(X[:, :-1])
    blob = pred.to_bytes()
    with pytest.raises(ValueError, match="magic"):
        Predictor.from_bytes(b"XXXX" + blob[4:], N_EMBD, N_FF)
    with pytest.raises(ValueError, match="n_ff=201"):
        Predictor.from_bytes(blob, N_EMBD, N_FF + 1)
    with pytest.raises(ValueError, match="blob_size"):
        Predictor.from_bytes(blob[:-64], N_EMBD, N_FF)


def test_fit_mask_is_fitted_threshold_tuned_on_y(data):
    """Y_fit is what the loss fits; the threshold is still tuned to the recall target of Y."""
    X, Y, X_test, Y_test = data
    Xo = np.concatenate([X, X_test])  # another teacher's mask (10% active) on the same inputs
    rng = np.random.default_rng(5)
    A = rng.standard_normal((N_EMBD, 16)).astype(np.float32)
    B = rng.standard_normal((16, N_FF)).astype(np.float32)
    s = np.maximum(Xo.astype(np.float32) @ A, 0) @ B
    Yo = s > np.quantile(s, 0.9)
    F, F_test = Yo[:2400], Yo[2400:]
    pred, m = train(X, Y, rank=32, recall_target=0.9, seed=3, epochs=15, batch=64, Y_fit=F)
    plain, _ = train(X, Y, rank=32, recall_target=0.9, seed=3, epochs=15, batch=64)
    assert m["fit_fraction"] == pytest.approx(F[:-240].mean())
    # threshold: recall 0.9 of Y on the validation tail, as without Y_fit
    assert metrics(pred.predict(X[-240:]), Y[-240:])["recall"] >= 0.9
    assert m["val_recall"] >= 0.9
    # the logits rank the fitted mask's neurons, not Y's: top 10% of test logits
    def top_recall(p, mask):
        lg = p.logits(X_test)
        return metrics(lg > np.quantile(lg, 0.9), mask)["recall"]
    assert top_recall(pred, F_test) > 0.6 > top_recall(plain, F_test)
    assert top_recall(plain, Y_test) > top_recall(pred, Y_test)


def test_fit_mask_shape_checked(data):
    X, Y, _, _ = data
    with pytest.raises(ValueError, match="Y_fit has shape"):
        train(X, Y, rank=4, epochs=1, Y_fit=Y[:-1])


def test_inputs_spanning_ten_orders_of_magnitude(data):
    """FFN inputs with features of 1e4 and of 1e-7 (gemma family): the stored weights stay finite
    and in float16 range, the standardisation is stored in float32, and the predictor still learns."""
    X, Y, X_test, Y_test = data
    col = np.ones(N_EMBD, np.float32)
    col[:2], col[2:6] = 1e4, 1e-7
    Xw, Xw_test = X.astype(np.float32) * col, X_test.astype(np.float32) * col
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow or invalid value
        pred, m = train(Xw, Y, rank=32, recall_target=0.9, seed=3, epochs=15, batch=64)
        blob = pred.to_bytes()
    back = Predictor.from_bytes(blob, N_EMBD, N_FF)
    np.testing.assert_array_equal(back.predict(Xw_test), pred.predict(Xw_test))
    # same quality as on the plainly scaled inputs
    assert metrics(pred.predict(Xw_test), Y_test)["recall"] >= 0.85
    assert m["val_recall"] >= 0.9


def test_input_scale_round_trip(trained, data):
    pred, _ = trained
    _, _, X_test, _ = data
    s = 2.0 ** -12
    raw = pred.for_input_scale(s)
    np.testing.assert_array_equal(raw.logits(X_test.astype(np.float32) / np.float32(s)), pred.logits(X_test))


def test_non_finite_refused_and_old_version_refused(trained):
    pred, _ = trained
    bad = Predictor(rank=pred.rank, n_embd=N_EMBD, n_ff=N_FF, W1=pred.W1, b1=pred.b1, W2=pred.W2, b2=pred.b2,
                    threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold is nan"):
        bad.to_bytes()
    bad.threshold, bad.x_scale = 0.0, np.full(N_EMBD, np.inf, np.float32)
    with pytest.raises(ValueError, match="x_scale holds inf"):
        bad.to_bytes()
    blob = bytearray(pred.to_bytes())
    blob[4:8] = (1).to_bytes(4, "little")
    with pytest.raises(ValueError, match="version 1, this reader knows only version 2"):
        Predictor.from_bytes(bytes(blob), N_EMBD, N_FF)
