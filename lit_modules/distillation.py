"""Knowledge distillation's loss (Hinton et al. 2015), framework-free so a training module can wire it in later.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes (the
soft gradients shrink as 1 / T^2). Logits may carry leading dimensions (``[batch, classes]`` for
classification, ``[batch, tokens, classes]`` for tagging); positions whose label is ``ignore_index`` (padding,
continuation sub-tokens) count in neither term, and both terms are means over the counted positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100) -> torch.Tensor:
    """Hinton et al.'s soft-target loss mixed with cross-entropy on the gold labels.

    ``teacher_logits`` are treated as constants (no gradient reaches the teacher). ``labels`` may be None only
    when ``alpha`` is 1 (pure distillation, e.g. on unlabelled data).
    """
    if temperature <= 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if labels is None and alpha < 1.0:
        raise ValueError("labels: needed unless alpha is 1 (the cross-entropy term has weight 1 - alpha)")
    classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, classes)
    teacher = teacher_logits.detach().reshape(-1, classes).to(student.dtype)
    keep = None
    if labels is not None:
        flat = labels.reshape(-1)
        if flat.shape[0] != student.shape[0]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the logits' leading shape "
                             f"{tuple(student_logits.shape[:-1])}")
        keep = flat != ignore_index
        student, teacher, flat = student[keep], teacher[keep], flat[keep]
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0  # nothing to learn from: a zero that keeps the graph
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    soft = temperature**2 * kl
    if alpha == 1.0:
        return soft
    hard = F.cross_entropy(student, flat)
    return alpha * soft + (1.0 - alpha) * hard
