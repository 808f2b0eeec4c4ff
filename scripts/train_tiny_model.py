"""Train digits-flux: a small Flux pipeline that draws scikit-learn's digits from "digit N" prompts.

    python scripts/train_tiny_model.py                      # train (CPU, 1 thread), write the shipped folder
    python scripts/train_tiny_model.py --sample-grid docs/images/digits_flux_samples.png   # samples 0-9

Trains the transformer of a real diffusers FluxPipeline with flow matching on
`sklearn.datasets.load_digits` (1797 images of 8x8, bundled, no download) and saves the pipeline with
``save_pretrained`` (safetensors): the transformer, a hand-set VAE, the frozen text encoders and
their tokenizers, the scheduler, and ``training_config.json`` (every flag, the seed, the loss, the
CPU and wall time). xfuser's FluxPipeline wrapper loads the folder like any model.

Latent setup (pixel space): the latent is the 16x16 grey image (the digit upsampled 2x, -1 ink,
+1 paper, random shifts of up to 1 pixel as augmentation); Flux packs it 2x2 into 64 tokens of 4
values. The VAE has one block level (vae_scale_factor 1) and is set by hand, not trained: its
decoder returns RGB = the latent's grey value, exact up to float rounding (a GroupNorm whose mean is
cancelled by a +z/-z channel pair and whose variance is pinned by two +-K constant channels, then
SiLU(a) - SiLU(-a) = a), and its encoder is the inverse. So the pipeline's PNG is the latent itself.

Conditioning: the prompt reaches the transformer through CLIP's pooled embedding (the adaLN vector).
The T5 encoder's final norm is zeroed, so all its tokens are 0 and every text token entering the
transformer is the same constant. L identical tokens attend exactly like one token whose attention
logit is raised by log L; training therefore uses one text token with a random log L bias
(L in 1..--max-text-tokens), and the model works at any --max_sequence_length.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "compactfusion_xdit", "models", "weights", "digits-flux")
CLIP_SPECIALS = ["<|endoftext|>", "<|startoftext|>"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
WORDS = ["digit"] + [str(d) for d in range(10)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
TEXT_DIM = 32  # CLIP and T5 hidden size = the transformer's pooled/joint attention dims


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="folder to write (replaced); default: the shipped model")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the batches and the noise")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (the learning-rate schedule's length)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate (cosine decay to 10%%)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA of the weights; the EMA is saved")
    p.add_argument("--double-blocks", type=int, default=2)
    p.add_argument("--single-blocks", type=int, default=4)
    p.add_argument("--heads", type=int, default=4, help="attention heads (Ulysses degree must divide it)")
    p.add_argument("--head-dim", type=int, default=24, help="per-head size (rope axes: 4 + 2 x (head_dim-4)/2)")
    p.add_argument("--size", type=int, default=16, help="image side in pixels (digits are upsampled to it)")
    p.add_argument("--max-text-tokens", type=int, default=512, help="largest text length the training covers")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float16",
                   help="dtype of the saved transformer weights (float16 halves the folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--max-wall-minutes", type=float, default=None,
                   help="stop early (and save) after this much wall time; the record says where it stopped")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sample-grid", metavar="PNG", default=None,
                   help="do not train: draw digits 0-9 (rows: seeds) from the --out folder into PNG")
    p.add_argument("--grid-seeds", type=int, default=4, help="rows of the sample grid (seeds 0..N-1)")
    p.add_argument("--grid-steps", type=int, default=20, help="sampling steps of the grid")
    args = p.parse_args(argv)
    if args.heads < 1 or args.head_dim < 8 or args.head_dim % 4:
        p.error("--head-dim must be a multiple of 4 and at least 8 (rope axes need even sizes)")
    if args.size % 2 or args.size < 8:
        p.error("--size must be even and at least 8 (Flux packs 2x2)")
    return args


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def word_tokenizer(specials: list[str], **kwargs):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=kwargs["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def text_encoders():
    """A one-layer CLIP (its pooled output carries the prompt) and a one-layer T5 whose output is 0."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.zero_()  # every text token is then the same constant
    clip_tok = word_tokenizer(CLIP_SPECIALS, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)
    t5_tok = word_tokenizer(T5_SPECIALS, unk_token="<unk>", eos_token="</s>", pad_token="<pad>", model_max_length=512)
    return clip, clip_tok, t5.eval(), t5_tok


def exact_vae(k: float = 1024.0):
    """An AutoencoderKL (one level, 1 latent channel, 4 channels inside) set so decode(z) = (z, z, z).

    Every resnet's second conv is zero (the block is the identity). conv_in makes channels
    (z, -z, +k, -k): the one-group GroupNorm then has mean exactly 0 and std sqrt((k^2 + mean z^2)/2),
    i.e. k/sqrt(2) up to 1e-7 relative; its weight k/sqrt(2) restores a = z, and conv_out takes
    SiLU(a) - SiLU(-a) = a. The encoder does the same from the mean of RGB, with logvar -30.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], block_out_channels=[4], layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0, force_upcast=False)
    gain = k / math.sqrt(2.0)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder, inputs in ((vae.encoder, 3), (vae.decoder, 1)):
            coder.conv_in.weight[0, :, 1, 1] = 1.0 / inputs
            coder.conv_in.weight[1, :, 1, 1] = -1.0 / inputs
            coder.conv_in.bias[2:] = torch.tensor([k, -k])
            coder.conv_norm_out.weight[:2] = gain
        vae.decoder.conv_out.weight[:, 0, 1, 1] = 1.0
        vae.decoder.conv_out.weight[:, 1, 1, 1] = -1.0
        vae.encoder.conv_out.weight[0, 0, 1, 1] = 1.0   # mean
        vae.encoder.conv_out.weight[0, 1, 1, 1] = -1.0
        vae.encoder.conv_out.bias[1] = -30.0             # logvar
    return vae


def transformer(args: argparse.Namespace):
    from diffusers import FluxTransformer2DModel

    side = (args.head_dim - 4) // 2
    axes = [4, side, args.head_dim - 4 - side]
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=args.double_blocks,
                                  num_single_layers=args.single_blocks, attention_head_dim=args.head_dim,
                                  num_attention_heads=args.heads, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=TEXT_DIM, axes_dims_rope=axes, guidance_embeds=False)


def untrained_pipeline(args: argparse.Namespace):
    """Every component, built in a fixed order under `args.seed`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(args.seed)
    clip, clip_tok, t5, t5_tok = text_encoders()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=exact_vae(), text_encoder=clip.eval(),
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer(args))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def digit_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as (N, 1, size, size) grey latents in [-1, 1] (ink -1, paper +1), and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return 1.0 - 2.0 * x, torch.tensor(data.target, dtype=torch.long)


def shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to one pixel in each direction (paper fills the border)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=1.0)
    dy, dx = torch.randint(0, 3, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> dict:
    from diffusers import FluxPipeline

    torch.set_num_threads(args.threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    pipe = untrained_pipeline(args)
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt(prompt=[f"digit {d}" for d in range(10)], prompt_2=None,
                                             max_sequence_length=1)
    if text.abs().max() != 0:
        raise RuntimeError("the T5 encoder should output zeros")
    images, labels = digit_images(args.size)
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    side = args.size // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    txt_ids = torch.zeros(1, 3)
    context = text[:1].expand(args.batch_size, 1, TEXT_DIM)
    generator = torch.Generator().manual_seed(args.seed)
    log_max_tokens = math.log(args.max_text_tokens)
    losses: list[float] = []
    b = args.batch_size

    def pack(x: torch.Tensor) -> torch.Tensor:
        return FluxPipeline._pack_latents(x, b, 1, args.size, args.size)

    steps_done = 0
    for step in range(args.steps):
        if args.max_wall_minutes is not None and time.perf_counter() - wall0 > 60 * args.max_wall_minutes:
            print(f"stopping at step {step} of {args.steps}: --max-wall-minutes {args.max_wall_minutes}", flush=True)
            break
        idx = torch.randint(0, len(images), (b,), generator=generator)
        x0 = shifted(images[idx], generator)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(b, generator=generator))  # logit-normal noise levels
        s = sigma.view(b, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        bias = torch.zeros(b, 1, 1, 1 + side * side)  # the text token comes first in Flux's joint sequence
        bias[:, 0, 0, 0] = torch.rand(b, generator=generator) * log_max_tokens
        pred = model(hidden_states=pack(xt), encoder_hidden_states=context, pooled_projections=pooled[labels[idx]],
                     timestep=sigma, img_ids=img_ids, txt_ids=txt_ids,
                     joint_attention_kwargs={"attention_mask": bias}, return_dict=False)[0]
        loss = F.mse_loss(pred, pack(noise - x0))
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema_decay)
        losses.append(loss.item())
        steps_done = step + 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            print(f"step {step + 1}/{args.steps}  loss {recent:.4f}  cpu {time.process_time() - cpu0:.0f}s  "
                  f"wall {time.perf_counter() - wall0:.0f}s", flush=True)

    pipe.transformer = ema.eval().to(getattr(torch, args.save_dtype))
    pipe.register_modules(transformer=pipe.transformer)
    tail = losses[-min(100, len(losses)):]
    summary = {"final_loss_last_100": sum(tail) / len(tail), "cpu_seconds": time.process_time() - cpu0,
               "wall_seconds": time.perf_counter() - wall0, "steps_done": steps_done,
               "transformer_parameters": sum(p.numel() for p in ema.parameters())}
    save(pipe, args, summary)
    return summary


def save(pipe, args: argparse.Namespace, summary: dict) -> None:
    """Write the pipeline and training_config.json into a temporary folder, then replace args.out."""
    import diffusers
    import sklearn
    import transformers

    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-flux.tmp-", dir=parent)
    pipe.save_pretrained(tmp, safe_serialization=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sample_grid", "grid_seeds", "grid_steps")}
    record = {
        "command": "python scripts/train_tiny_model.py " + " ".join(sys.argv[1:]),
        "settings": settings,
        **summary,
        "data": "sklearn.datasets.load_digits (1797 images, 8x8, values 0-16), bilinear to size x size, "
                "latent = 1 - 2 * value / 16, random shifts of up to 1 pixel",
        "prompt": "digit N (N = 0..9)",
        "objective": "flow matching: x_t = (1 - s) x0 + s noise, s = sigmoid(N(0, 1)), target noise - x0",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "sklearn": sklearn.__version__,
                     "python": platform.python_version()},
        "machine": platform.processor() or platform.machine(),
    }
    with open(os.path.join(tmp, "training_config.json"), "w") as f:
        json.dump(record, f, indent=2)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.rename(tmp, args.out)
    print(f"wrote {args.out}")


# --------------------------------------------------------------------------------------------
# Sample grid
# --------------------------------------------------------------------------------------------


def sample_grid(args: argparse.Namespace) -> str:
    """Digits 0-9 (columns) for seeds 0..grid_seeds-1 (rows), each 16x16 image drawn 4x larger."""
    from PIL import Image

    from compactfusion_xdit.models import digits

    torch.set_num_threads(args.threads)
    pipe = digits.load_pipeline(path=args.out)
    pipe.set_progress_bar_config(disable=True)
    scale, pad = 4, 2
    cell = args.size * scale + pad
    grid = Image.new("RGB", (10 * cell + pad, args.grid_seeds * cell + pad), (128, 128, 128))
    for row in range(args.grid_seeds):
        out = pipe([digits.prompt(d) for d in range(10)], height=args.size, width=args.size,
                   num_inference_steps=args.grid_steps, max_sequence_length=16,
                   generator=[torch.Generator().manual_seed(row * 10 + d) for d in range(10)])
        for d, image in enumerate(out.images):
            grid.paste(image.resize((args.size * scale,) * 2, Image.NEAREST), (pad + d * cell, pad + row * cell))
    os.makedirs(os.path.dirname(os.path.abspath(args.sample_grid)), exist_ok=True)
    grid.save(args.sample_grid)
    print(f"wrote {args.sample_grid}")
    return args.sample_grid


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sample_grid:
        sample_grid(args)
    else:
        summary = train(args)
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
