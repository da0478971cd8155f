"""The losses equal an independent NumPy reference written from the equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cil_dist.training.losses import cross_entropy, finetune_loss, incremental_loss

N, C_OLD, C, H, W = 2, 4, 7, 3, 4


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - math.log(np.exp(shifted).sum())


def reference(student, teacher, labels, c_old, temperature, lam):
    """Per-pixel loops over the equations of the paper (Sec. III), float64."""
    ce_terms, kd_terms = [], []
    for n in range(student.shape[0]):
        for i in range(student.shape[2]):
            for j in range(student.shape[3]):
                s, y = student[n, :, i, j], labels[n, i, j]
                if y != 255:
                    ce_terms.append(-log_softmax(s)[y])  # channels C_old.. of an all-C softmax
                else:
                    t = teacher[n, :, i, j] / temperature
                    q = np.exp(log_softmax(t))
                    r = log_softmax(s / temperature)[:c_old]
                    entropy = -sum(qc * math.log2(qc) for qc in q if qc > 0)
                    kd_terms.append((1 + lam * entropy) * -(q * r).sum())
    ce = float(np.mean(ce_terms)) if ce_terms else 0.0
    kd = temperature**2 * float(np.mean(kd_terms)) if kd_terms else 0.0
    return ce + kd, ce, kd


def random_case(seed: int, labelled_fraction: float):
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 2, (N, C, H, W))
    teacher = rng.normal(0, 2, (N, C_OLD, H, W))
    labels = rng.integers(C_OLD, C, (N, H, W))
    labels[rng.random((N, H, W)) >= labelled_fraction] = 255
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("lam", [1.0, 0.5, 3.0, 0.0])
@pytest.mark.parametrize("labelled", [0.5, 1.0, 0.0])
def test_incremental_loss_matches_reference(temperature, lam, labelled):
    student, teacher, labels = random_case(int(temperature * 10 + lam * 3), labelled)
    total, ce, kd = incremental_loss(
        torch.tensor(student, dtype=torch.float32, requires_grad=True),
        torch.tensor(teacher, dtype=torch.float32),
        torch.tensor(labels),
        C_OLD,
        temperature=temperature,
        lambda_gs=lam,
    )
    want = reference(student, teacher, labels, C_OLD, temperature, lam)
    np.testing.assert_allclose([total.item(), ce.item(), kd.item()], want, rtol=1e-5, atol=1e-6)
    assert total.dtype == torch.float32 and torch.isfinite(total)


def test_single_labelled_pixel():
    student, teacher, labels = random_case(3, 0.0)
    labels[1, 2, 3] = C - 1
    total, ce, kd = incremental_loss(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), C_OLD
    )
    want = reference(student, teacher, labels, C_OLD, 1.0, 1.0)
    np.testing.assert_allclose([total.item(), ce.item(), kd.item()], want, rtol=1e-6)


def test_gradients_match_finite_differences():
    student, teacher, labels = random_case(11, 0.5)
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(teacher, dtype=torch.float64)
    y = torch.tensor(labels)
    torch.autograd.gradcheck(
        lambda x: incremental_loss(x, t, y, C_OLD, temperature=2.0, lambda_gs=0.7)[0].double(),
        (s,),
    )


def test_extremes_are_finite_and_differentiable():
    for labelled in (0.0, 1.0):
        student, teacher, labels = random_case(5, labelled)
        s = torch.tensor(student, dtype=torch.float32, requires_grad=True)
        total, ce, kd = incremental_loss(s, torch.tensor(teacher), torch.tensor(labels), C_OLD)
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(s.grad).all()
        assert (ce.item() == 0.0) == (labelled == 0.0)
        assert (kd.item() == 0.0) == (labelled == 1.0)


def test_bf16_inputs_give_a_float32_result_close_to_float32():
    student, teacher, labels = random_case(7, 0.5)
    full = incremental_loss(
        torch.tensor(student).float(), torch.tensor(teacher).float(), torch.tensor(labels), C_OLD
    )[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = incremental_loss(
            torch.tensor(student).bfloat16(),
            torch.tensor(teacher).bfloat16(),
            torch.tensor(labels),
            C_OLD,
        )[0]
    assert half.dtype == torch.float32
    assert abs(half.item() - full.item()) < 0.05 * abs(full.item())


def test_inference_mode_teacher_gets_no_gradient():
    student, teacher, labels = random_case(9, 0.5)
    with torch.inference_mode():
        t = torch.tensor(teacher, dtype=torch.float32) * 1.0
    assert t.is_inference()
    s = torch.tensor(student, dtype=torch.float32, requires_grad=True)
    total, _, _ = incremental_loss(s, t, torch.tensor(labels), C_OLD)
    total.backward()
    assert s.grad is not None and t.grad is None


def test_finetune_and_static_cross_entropy_match_reference():
    student, teacher, labels = random_case(13, 0.6)
    ft = finetune_loss(torch.tensor(student), torch.tensor(labels), C_OLD)
    assert ft.item() == pytest.approx(reference(student, teacher, labels, C_OLD, 1, 1)[1])
    static_labels = np.where(labels == 255, 255, labels - C_OLD)
    logits = student[:, :3]
    terms = [
        -log_softmax(logits[n, :, i, j])[static_labels[n, i, j]]
        for n in range(N)
        for i in range(H)
        for j in range(W)
        if static_labels[n, i, j] != 255
    ]
    got = cross_entropy(torch.tensor(logits), torch.tensor(static_labels))
    assert got.item() == pytest.approx(float(np.mean(terms)))
    assert cross_entropy(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 255)).item() == 0.0


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"teacher logits \(2, 3, 3, 4\)"):
        incremental_loss(
            torch.zeros(N, C, H, W),
            torch.zeros(N, 3, H, W),
            torch.zeros(N, H, W, dtype=torch.long),
            C_OLD,
        )
    with pytest.raises(ValueError, match="new-task channels"):
        incremental_loss(
            torch.zeros(N, C, H, W),
            torch.zeros(N, C_OLD, H, W),
            torch.zeros(N, H, W, dtype=torch.long),
            C_OLD,
        )
