"""Recording: one hook per module and per tensor, whatever the number of callbacks; a tensor asked for
again gets the row it has."""

from __future__ import annotations

import torch
from torch import nn

from gpas_probe.probes.recording import Recording


def test_callbacks_on_one_module_share_one_hook_and_run_in_order() -> None:
    module, calls = nn.Identity(), []
    rec = Recording(1)
    for name in "abc":
        rec.on_forward(module, lambda x, name=name: calls.append((name, x)))
    assert len(module._forward_hooks) == 1 and rec.num_hooks == 1
    x = torch.ones(2, 3)
    module(x)
    assert [n for n, _ in calls] == ["a", "b", "c"] and all(y is x for _, y in calls)
    with torch.no_grad():
        module(x)  # evaluation is not recorded
    assert len(calls) == 3
    rec.close()
    assert not module._forward_hooks and rec.num_hooks == 0


def test_callbacks_on_one_tensor_share_one_hook_and_see_its_gradient() -> None:
    w = torch.randn(3, requires_grad=True)
    y, z = w * 2, w * 3
    rec, seen = Recording(1), []
    rec.on_grad(y, lambda g: seen.append(("y1", g.clone())))
    rec.on_grad(y, lambda g: seen.append(("y2", g.clone())))
    rec.on_grad(z, lambda g: seen.append(("z", g.clone())))
    assert rec.num_hooks == 2
    (y.sum() * 5 + z.sum()).backward()
    got = dict(seen)
    assert [n for n, _ in seen if n != "z"] == ["y1", "y2"]
    torch.testing.assert_close(got["y1"], torch.full((3,), 5.0))
    torch.testing.assert_close(got["y2"], got["y1"])
    torch.testing.assert_close(got["z"], torch.ones(3))
    torch.testing.assert_close(w.grad, torch.full((3,), 13.0))  # the gradient itself is unchanged
    rec.close()


def test_a_tensor_asked_for_again_gets_its_row_unless_changed_in_place() -> None:
    rec = Recording(1)
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    rx = rec.token_row(x, forward=True)
    assert rec.token_row(x, forward=True) == rx  # in turn, as the families of one hook point ask
    ry = rec.token_row(y, forward=True)
    assert ry != rx and rec.token_row(x, forward=True) == rx  # not in turn
    x.mul_(2)
    assert rec.token_row(x, forward=True) not in (rx, ry)  # new values: a new row
    assert rec.rows is not None and rec.rows.n == 3
    rec.close()
