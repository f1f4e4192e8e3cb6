"""A plain PyTorch training loop on a fused loss: patch the model, train as usual.

    python examples/torch_loop.py

``patch_causal_lm`` makes ``model(..., labels=labels)`` return the stock Hugging Face
loss computed by the fused kernels inside the model's own forward: ``out.logits`` is None
and no [batch, tokens, vocab] tensor exists. Generation is unchanged.
"""
import torch

import tiny
from fused_losses import patch_causal_lm

tokenizer, model = tiny.tokenizer(), tiny.model()
patch_causal_lm(model)

batch = tokenizer(tiny.texts(32), return_tensors="pt", padding=True)
labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # HF labels: no shift
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

model.train()
for step in range(30):
    rows = slice(8 * (step % 4), 8 * (step % 4 + 1))
    out = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                labels=labels[rows])
    assert out.logits is None
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  loss {out.loss.item():.4f}")

model.eval()
prompt = tokenizer(["what is 3 plus 4 ?"], return_tensors="pt")
generated = model.generate(**prompt, max_new_tokens=2, do_sample=False)
print("generated:", tokenizer.decode(generated[0]))
