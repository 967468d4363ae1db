"""Joint training: the questioner's loss reaches the selector only through the
straight-through Gumbel top-k."""

from __future__ import annotations

import torch

from llava_reid.questioner.loading import ImageTokens, attach_lora
from llava_reid.questioner.sft_data import Example
from llava_reid.selector.joint import JointLoss
from llava_reid.selector.model import Selector
from tests.test_questioner import QCFG, _images, questioner, tiny_folder  # noqa: F401

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": []}


class _Cache:
    def __init__(self, tokens):
        self.by_id = {100 + i: t for i, t in enumerate(tokens)}

    def tokens(self, ids):
        return [self.by_id[i] for i in ids]


def _joint(q, straight_through: bool):
    torch.manual_seed(0)
    tokens = q.encode_images(_images(8))
    feats = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    selector = Selector(16, layers=1, heads=2, ffn=32, dropout=0.0)
    module = JointLoss(q, selector, feats, torch.arange(100, 108),
                       ImageTokens(q, _Cache(tokens), {}), pool_size=8, num_candidates=3,
                       straight_through=straight_through)
    examples = [Example(i, 100 + i, 0, (0, "I saw a man.", (), ()), "Was he carrying a bag?",
                        tuple(range(100, 108)), 1.0) for i in range(2)]
    pools = torch.arange(8).repeat(2, 1)
    query = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    loss = module(examples, query, pools, torch.zeros(2, dtype=torch.long), 0.5,
                  torch.Generator().manual_seed(3))
    loss.backward()
    return selector, loss


def test_questioner_loss_trains_the_selector_through_the_sampler(tiny_folder):  # noqa: F811
    from llava_reid.questioner.model import Questioner

    q = Questioner.from_pretrained(tiny_folder, QCFG, "cpu")
    attach_lora(q, {"lora": LORA, "train_projector": False,
                    "sft": {"gradient_checkpointing": False}})
    selector, loss = _joint(q, straight_through=True)
    assert torch.isfinite(loss)
    grads = [p.grad for p in selector.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    lora = [p for n, p in q.net.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora)


def test_hard_only_sampler_passes_no_gradient_to_the_selector(tiny_folder):  # noqa: F811
    from llava_reid.questioner.model import Questioner

    q = Questioner.from_pretrained(tiny_folder, QCFG, "cpu")
    attach_lora(q, {"lora": LORA, "train_projector": False,
                    "sft": {"gradient_checkpointing": False}})
    selector, loss = _joint(q, straight_through=False)
    assert torch.isfinite(loss)
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in selector.parameters())
