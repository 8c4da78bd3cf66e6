"""Which timm and torchvision CNNs adjoin, and is each adjoined network the model it came from?

    python benchmarks/adjoin_coverage.py                      # the 60 timm CNNs below
    python benchmarks/adjoin_coverage.py --set hybrids        # 60 more: hybrids, ViTs, MLPs, CNNs
    python benchmarks/adjoin_coverage.py --set torchvision    # torchvision's 22 CNNs below
    python benchmarks/adjoin_coverage.py resnet50d torchvision:convnext_tiny   # or name the models

For each architecture (random weights, the parameters the library starts at zero drawn
too, so that every residual branch counts; 10 classes, nothing downloaded):
`anfast.adjoin(model, alpha, policy="all")`, one forward of both on a batch with their
norms in train mode (the running statistics move), then in eval mode, in float64, the adjoined base
against the model itself and the exported student (the model's own class with smaller
layers) against the adjoined student. A row says "adjoins" only when both
agree to 1e-9 (relative); else "differs", "refused" (adjoin's reason, which names the
node and the fix) or "failed" (any other error). Parameters of base and student come
with it, and how many width groups keep full width (ops anfast runs whole, slices,
grouped convs, the output): a model adjoins exactly however little of it shrinks. The
JSON goes to results/adjoin_coverage-<cpu>-<date>.json (adjoin_coverage_hybrids-... for
the second set, adjoin_coverage_torchvision-... for the third). A vision transformer or
an MLP "adjoins" with a student that equals the base: its tokens run whole, and adjoin
warns that nothing shrinks.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

import anfast  # noqa: E402

# Families timm builds without downloading: ResNets and their attention variants, the
# mobile nets, CSP / DarkNet, RegNets, DenseNet, HRNet, VoVNet, NFNets, ConvNeXt, ...
MODELS = """resnet18 resnet50d seresnet50 ecaresnet26t gcresnet33ts skresnet18 resnext26ts res2net50_14w_8s
resnest14d dla34 dpn68 densenet121 vgg11 efficientnet_b0 efficientnet_lite0 mobilenetv2_100 mobilenetv3_small_100
mixnet_s ghostnet_100 regnetx_002 regnety_002 regnetz_005 rexnet_100 hrnet_w18_small cspresnet50 cspdarknet53
cs3darknet_s convnext_atto convnextv2_atto repvgg_a0 tinynet_a fbnetv3_b lcnet_050 hardcorenas_a nf_resnet26
selecsls42 ese_vovnet19b_dw tresnet_m inception_v3 xception41 mnasnet_100 spnasnet_100 resnetv2_50 gernet_s
mobileone_s0 inception_next_atto convnext_tiny dm_nfnet_f0 botnet26t_256 halonet26t lambda_resnet26t sebotnet33ts_256 resnet18d
eca_nfnet_l0 efficientnetv2_rw_t mobilevit_xxs edgenext_xx_small poolformer_s12 convmixer_768_32 sedarknet21""".split()
# CNN-transformer hybrids, vision transformers, MLP mixers and more CNNs: where anfast runs
# attention whole, which blocks timm keeps whole, what a transformer's student is.
HYBRIDS = """maxvit_nano_rw_256 coatnet_nano_rw_224 fastvit_t8 repvit_m1 efficientformer_l1 efficientformerv2_s0
levit_128s mobilevitv2_050 ghostnetv2_100 hgnet_tiny hgnetv2_b0 mobilenetv4_conv_small mobilenetv4_hybrid_medium
rdnet_tiny starnet_s1 inception_v4 inception_resnet_v2 dla60x hrnet_w18 vgg11_bn densenetblur121d resnetblur18
resnetaa50d seresnext26d_32x4d skresnext50_32x4d resnest26d regnety_008 nf_regnet_b0 xcit_nano_12_p16_224
vit_tiny_patch16_224 swin_tiny_patch4_window7_224 convit_tiny pvt_v2_b0 twins_svt_small mvitv2_tiny davit_tiny
focalnet_tiny_srf efficientvit_b0 efficientvit_m0 tiny_vit_5m_224 sequencer2d_s mixer_s16_224 resmlp_12_224
gmlp_ti16_224 visformer_tiny volo_d1_224 crossvit_tiny_240 ese_vovnet39b mixnet_m cs3sedarknet_l resnet26t
resnetrs50 coat_tiny poolformerv2_s12 caformer_s18 convformer_s18 nextvit_small fasternet_t0 shvit_s1
inception_next_tiny""".split()
# torchvision's classification CNNs, one or two per family, as anfast's --arch builds them
# (anfast.models.create_model: GoogLeNet and Inception-v3 without their auxiliary heads);
# its transformers (ViT, Swin, MaxViT) are left to timm's in the hybrids.
TORCHVISION = ["torchvision:" + name for name in """alexnet convnext_tiny densenet121 efficientnet_b0
efficientnet_v2_s googlenet inception_v3 mnasnet0_5 mnasnet1_0 mobilenet_v2 mobilenet_v3_large mobilenet_v3_small
regnet_x_400mf regnet_y_400mf resnet18 resnet50 resnext50_32x4d shufflenet_v2_x1_0 squeezenet1_0 squeezenet1_1
vgg11_bn wide_resnet50_2""".split()]
SETS = {"cnns": MODELS, "hybrids": HYBRIDS, "torchvision": TORCHVISION}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def draw_zero_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each parameter that starts at zero drawn from N(0, 0.1): a residual
    block's last batch-norm weight (timm's zero_init_last), GRN's weight and bias, a
    skip-init gain zero a branch's output, and a comparison of outputs would not see what
    the branch computes. Returns ``model``."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    return model


def create(name: str) -> torch.nn.Module:
    """The model ``name`` names (a timm name, or ``torchvision:NAME``) with 10 classes, in
    float64, its parameters that start at zero drawn (draw_zero_parameters)."""
    if name.startswith("torchvision:"):
        from anfast.models import create_model

        model = create_model(name.split(":", 1)[1], num_classes=10)[0]
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10)
    return draw_zero_parameters(model.double())


def adjoin_at_its_size(model: torch.nn.Module, image_size: int, **options) -> tuple:
    """(``anfast.adjoin(model, input_size=(3, image_size, image_size), **options)``, the
    size it took): a model whose attention takes only its own input size (BoTNet, HaloNet)
    is adjoined at that size instead. Warnings that nothing shrinks are silenced: the
    caller's counts say it."""
    own_size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, image_size, image_size))[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return anfast.adjoin(model, input_size=(3, image_size, image_size), **options), image_size
        except anfast.AdjoinError as error:
            if "fails on an input of size" not in str(error) or own_size == image_size:
                raise
            return anfast.adjoin(model, input_size=(3, own_size, own_size), **options), own_size


def check(name: str, alpha: float, image_size: int) -> dict:
    """One model's row: status, reason or errors, parameters of base and student, width
    groups kept at full width. Base and exported student are compared in eval mode after
    one forward on a batch with the norms in train mode. A model whose attention takes only its own input size
    (BoTNet, HaloNet) is tried again at that size, which the row records."""
    torch.manual_seed(0)
    row: dict = {"model": name, "image_size": image_size}
    try:
        model = create(name)
        an, row["image_size"] = adjoin_at_its_size(model, image_size, alpha=alpha, policy="all")
        image_size = row["image_size"]
    except anfast.AdjoinError as error:
        return {**row, "status": "refused", "reason": str(error)}
    except Exception as error:  # the library or fx: the row names it, the survey goes on
        return {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
    row["groups"] = {"total": len(an.width_groups), "full_width": sum(bool(g.fixed) for g in an.width_groups)}
    x, batch = (torch.randn(n, 3, image_size, image_size, dtype=torch.float64) for n in (2, 4))
    with torch.no_grad():
        # One forward of each with its norms in train mode moves the running statistics:
        # the base's must stay the model's, each student's its own, which its export must
        # carry. Dropout and stochastic depth stay off: the two would draw other masks.
        for network in (an, model):
            network.eval()
            for module in network.modules():
                if isinstance(module, torch.nn.modules.batchnorm._NormBase):
                    module.train()
            network(batch)
        out = an.eval()(x)
        student = anfast.export_student(an).eval()
        row["base_error"] = _relative_error(out.base, model.eval()(x))
        row["student_error"] = _relative_error(student(x), out.student)
    row["status"] = "adjoins" if max(row["base_error"], row["student_error"]) <= 1e-9 else "differs"
    row["params"] = {"base": anfast.count_parameters(model), "student": anfast.count_parameters(student)}
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="timm model names or torchvision:NAME (default: the --set)")
    parser.add_argument("--set", choices=SETS, default="cnns", help="which list to try (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=2)
    parser.add_argument("--image-size", type=int, default=96, help="of the tracing and checking input")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/adjoin_coverage-<cpu>-<date>.json)")
    args = parser.parse_args(argv)
    try:
        import timm
    except ImportError:
        parser.error("timm is not installed: pip install timm (or the [test] extra)")

    models = args.models or SETS[args.set]
    benchmark = "adjoin_coverage" if args.models or args.set == "cnns" else f"adjoin_coverage_{args.set}"
    payload = {**environment("cpu"), "timm": timm.__version__, "alpha": args.alpha, "policy": "all",
               "image_size": args.image_size, "set": None if args.models else args.set, "rows": []}
    def describe(row: dict) -> str:
        if row["status"] == "adjoins":
            return f"{row['params']['base'] / 1e6:.2f}M -> {row['params']['student'] / 1e6:.2f}M parameters"
        return (row.get("reason") or f"relative error {max(row['base_error'], row['student_error']):.1e}"
                ).splitlines()[0][:120]

    path = survey(models, lambda name: check(name, args.alpha, args.image_size), describe,
                  ("adjoins", "differs", "refused", "failed"), benchmark, payload, args.out, desc="adjoin")
    counts = payload["counts"]
    print(f"{counts['adjoins']} of {len(payload['rows'])} adjoin ({counts}); wrote {path}")
    return payload


def survey(models, check_one, describe, statuses, benchmark: str, payload: dict, out, desc: str) -> Path:
    """``check_one(name)`` for each model into ``payload["rows"]``, the JSON written after
    every row (a cut run keeps its rows) with a progress line (``describe(row)``); then
    ``payload["counts"]`` per status. Returns the JSON's path."""
    for name in tqdm(models, desc=desc, unit="model"):
        row = check_one(name)
        payload["rows"].append(row)
        write_result(benchmark, payload, out)
        tqdm.write(f"{name:24s} {row['status']:8s} {describe(row)}")
    payload["counts"] = {status: sum(r["status"] == status for r in payload["rows"]) for status in statuses}
    return write_result(benchmark, payload, out)


if __name__ == "__main__":
    main()
