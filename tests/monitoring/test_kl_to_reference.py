"""KL of a stage's model to the SFT model on the held-out prompts (monitoring.evaluation.kl_along_answers and
evaluate_heldout(kl_reference=...)): exact over the vocabulary along the policy's greedy answers."""

from __future__ import annotations

import copy

import pytest
import torch


def test_kl_along_answers_is_the_exact_token_kl_and_zero_to_itself(tiny_debug_path):
    from trl_safeppo.monitoring.evaluation import evaluate_heldout, kl_along_answers
    from trl_safeppo.monitoring.generation import _render, generate_greedy, load_policy
    from trl_safeppo.tasks.arithmetic import load_arithmetic

    model, tok = load_policy(tiny_debug_path)
    torch.manual_seed(0)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [r["prompt"] for r in load_arithmetic("eval", n=3)]
    gens = generate_greedy(model, tok, prompts, max_new_tokens=4, batch_size=3)
    assert all(1 <= len(g.ids) <= 4 for g in gens)

    # to itself: exactly 0 (the same log-probabilities at every position)
    assert kl_along_answers(model, tok, model, prompts, gens) == {"kl_to_reference": 0.0, "kl_to_reference_seq": 0.0}

    # against a perturbed copy: the same as KL(Categorical(p) || Categorical(q)) at each answer position, one
    # prompt at a time without padding (the function batches them, right-padded)
    token_kls, seq_kls = [], []
    for prompt, g in zip(prompts, gens):
        prompt_ids = tok(_render(tok, prompt), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + list(g.ids)])
        with torch.no_grad():
            p = torch.distributions.Categorical(logits=model(input_ids=ids).logits[0].float())
            q = torch.distributions.Categorical(logits=ref(input_ids=ids).logits[0].float())
        kl = torch.distributions.kl_divergence(p, q)[len(prompt_ids) - 1 : len(prompt_ids) + len(g.ids) - 1]
        token_kls += kl.tolist()
        seq_kls.append(float(kl.sum()))
    got = kl_along_answers(model, tok, ref, prompts, gens, batch_size=2)
    assert got["kl_to_reference"] == pytest.approx(sum(token_kls) / len(token_kls), rel=1e-4)
    assert got["kl_to_reference_seq"] == pytest.approx(sum(seq_kls) / len(seq_kls), rel=1e-4)
    assert got["kl_to_reference"] > 0

    # through the held-out evaluation: the same figures next to the accuracy
    result = evaluate_heldout(model, load_arithmetic("eval", n=3), accuracy_reward="math", tokenizer=tok,
                              max_new_tokens=4, kl_reference=ref)
    assert result["kl_to_reference"] == pytest.approx(got["kl_to_reference"], rel=1e-4)
