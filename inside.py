"""
A look inside a trained model: the path a text takes through its space. It runs a prompt and the
model's continuation, keeps the residual stream at each layer for every token (the embeddings, then
each block's output), projects each chosen layer's states on their first principal components, and
draws the trajectory token by token, one panel per layer (needs matplotlib).

    python inside.py --prompt "ROMEO:"                        # out/shakespeare/best.pt -> inside.png
    python inside.py --ckpt out/shakespeare/best.pt --prompt "To be, or not" --layers 0,2,4 --new-tokens 30

Layer 0 is the token embeddings, layer i the output of block i. Principal components come from
numpy's SVD of the centred states (no scikit-learn): the directions along which the tokens' states
differ most. Early layers group tokens by what they are; later ones by what comes next.
"""
from dataclasses import dataclass

import numpy as np
import torch

from checkpoint import load_for_inference
from common import check, die, parse_config, parse_flags, printable, run_main, setting

@dataclass
class InsideConfig:
    ckpt: str = setting("out/shakespeare/best.pt", "a checkpoint written by train.py")
    prompt: str = setting("ROMEO:", "the text to start from")
    new_tokens: int = setting(24, "tokens the model adds to it (greedy), whose path is drawn too")
    layers: str = setting("", "comma list of layers to draw (0 = embeddings); empty: first, middle and last")
    out: str = setting("inside.png", "the picture")

    def __post_init__(self):
        check(self.prompt, "--prompt is empty; give the text to start from")
        check(self.new_tokens >= 0, f"--new-tokens={self.new_tokens} must not be negative")

@torch.no_grad()
def hidden_states(model, idx):
    """The residual stream at every layer for idx (1, T): [(T, C) as numpy] of the embeddings (what the
    first block reads) and each block's output."""
    states = []
    hooks = [model.layers[0].register_forward_pre_hook(lambda module, args: states.append(args[0][0]))]
    hooks += [layer.register_forward_hook(lambda module, args, out: states.append(out[0])) for layer in model.layers]
    try:
        model(idx, targets=torch.zeros_like(idx))
    finally:
        for hook in hooks:
            hook.remove()
    return [s.float().numpy() for s in states]

def principal_components(states, k=2):
    """(states projected on their first k principal components (T, k), the share of the variance each
    explains): the SVD of the centred matrix, whose right singular vectors are the components."""
    centred = states - states.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:k].T, singular[:k] ** 2 / (singular ** 2).sum()

def draw(paths, labels, n_prompt, path):
    """One panel per layer: the tokens' states in order, joined by a line, each labelled with its text;
    the prompt's tokens in grey, the model's own in colour, darker as the text goes on."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        die("drawing needs matplotlib: pip install matplotlib")
    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 5), squeeze=False)
    for ax, (layer, (points, share)) in zip(axes[0], paths.items()):
        ax.plot(points[:, 0], points[:, 1], color="0.8", lw=1, zorder=1)
        colors = ["0.6"] * n_prompt + list(plt.cm.viridis(np.linspace(0, 0.9, len(points) - n_prompt)))
        ax.scatter(points[:, 0], points[:, 1], c=colors, s=18, zorder=2)
        for (x, y), text in zip(points, labels):
            ax.annotate(text, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        ax.set(title=f"layer {layer}" + (" (embeddings)" if layer == 0 else ""),
               xlabel=f"PC1 ({share[0]:.0%} of the variance)", ylabel=f"PC2 ({share[1]:.0%})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")

def main(argv):
    cfg = parse_config(InsideConfig, parse_flags(argv, [InsideConfig], __doc__))
    model, enc, eot_id, _ = load_for_inference(cfg.ckpt)
    model.eval()
    n_layer = model.config.n_layer
    try:
        layers = [int(x) for x in cfg.layers.split(",")] if cfg.layers else sorted({0, n_layer // 2, n_layer})
    except ValueError:
        die(f"--layers={cfg.layers} is not a comma list of numbers; e.g. --layers=0,2,{n_layer}")
    if not all(0 <= layer <= n_layer for layer in layers):
        die(f"--layers={cfg.layers}: this model has layers 0 (embeddings) to {n_layer}")
    prompt = [eot_id] + enc.encode_ordinary(cfg.prompt)  # a document starts with end-of-text, as in training
    idx = torch.tensor([prompt[-model.config.max_seq_len:]])
    n_prompt, room = idx.size(1), model.config.max_seq_len - idx.size(1)
    idx = model.generate(idx, min(cfg.new_tokens, room), temperature=0) if room and cfg.new_tokens else idx
    states = hidden_states(model, idx)
    paths = {layer: principal_components(states[layer]) for layer in layers}
    labels = [printable(enc.decode([t])).replace("\n", "\\n") for t in idx[0].tolist()]
    labels[0] = "<eot>"
    print(printable(enc.decode(idx[0, 1:].tolist())))
    draw(paths, labels, n_prompt, cfg.out)

if __name__ == "__main__":
    run_main(main)
