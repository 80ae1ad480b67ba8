"""rxnmapper's ALBERT (a masked language model of reaction SMILES), exported to ONNX from its PyPI wheel.

What is built: ``albert.onnx``, the ``AlbertForMaskedLM`` that rxnmapper (0.4.3, MIT) ships as
``rxnmapper/models/transformers/albert_heads_8_uspto_all_1310k`` (0.74 M parameters: embeddings of
128 projected to 256, 12 layers that all share one set of weights, 8 heads, FFN 512, a 591-token
SMILES vocabulary; trained on USPTO reactions). rxnmapper reads atom maps off one attention head of
this model; here the model's own task, predicting masked tokens, is the task metric.

* inputs ``input_ids`` and ``attention_mask``: int64 ``[batch, sequence]`` (both axes dynamic);
* output ``logits``: float32 ``[batch, sequence, 591]``.

Why: a transformer unlike the sentence embedders: tiny (3.5 MB, so latency is dominated by the
non-GEMM ops), and every weight is shared by the 12 layers.

Where the weights come from: the ``rxnmapper`` wheel is fetched with ``pip download --no-deps``
(:mod:`.wheels`) and the model folder is extracted from it; the package itself is not installed (it
pins its own transformers). Its SMILES tokenizer is a regex plus the folder's ``vocab.txt``, both
reproduced here.

Data (needs ``rdkit`` from PyPI, which also ships the molecules): no reaction data set ships in a
wheel, so reactions are made: a dozen textbook reaction templates (amide coupling, acylation,
sulfonylation, Boc protection, esterification, ester hydrolysis, nitro reduction, Buchwald and
Suzuki couplings, O-alkylation, reductive amination) are applied with RDKit to the first 5000 NCI
molecules that RDKit ships (``RDDataDir/NCI/first_5K.smi``), with simple partners and reagents,
written as rxnmapper writes its inputs (canonical SMILES, precursors sorted, ``>>`` product). The
split (``group_split``) is by NCI molecule: no held-out reaction shares its substrate with a
calibration reaction. 15 % of each reaction's tokens (at least one) are replaced by ``[MASK]``.
Task metric (``scores``): on the masked positions of the 512 held-out reactions, top-1 accuracy
against the true token and top-1 agreement with the fp32 model.
"""

from __future__ import annotations

import functools
import re
import shutil
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from . import _common, wheels

FORMAT = 1
PACKAGE, VERSION = "rxnmapper", "0.4.3"
WHEEL_FOLDER = "rxnmapper/models/transformers/albert_heads_8_uspto_all_1310k/"
FOLDER = "rxnmapper-albert"
OPSET = 17
VOCAB = 591
MAX_LENGTH = 128
LAYERS = 12
# Q, K, V, O, FFN in/out of the shared layer, read by all 12 layers; the embedding projection, the
# MLM head's dense layer and its decoder: 9 weights, 75 MatMuls.
WEIGHTS, WEIGHT_MATMULS = 9, 6 * LAYERS + 3
MASK_RATE = 0.15
MAX_ABS_DIFF = 1e-3  # on logits of magnitude ~10
PAD, CLS, SEP, MASK = "[PAD]", "[CLS]", "[SEP]", "[MASK]"
# rxnmapper's SMILES_REGEX (smiles_utils.SMI_REGEX_PATTERN): one token per atom, bond, ring digit, ...
SMILES_REGEX = re.compile(r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>>?|\*|\$"
                          r"|\%[0-9]{2}|[0-9])")

MODEL_FILE, META_FILE = "albert.onnx", "albert.json"
CALIB_FILE, EVAL_FILE, SPLITS_META = "albert_calib.npz", "albert_eval.npz", "albert_splits.json"


def model_dir(cache_dir: Path) -> Path:
    """The rxnmapper ALBERT folder under ``cache_dir``, extracted from the fetched wheel if absent."""
    cache_dir = Path(cache_dir)
    target = cache_dir / FOLDER
    if (target / ".complete").exists():
        return target
    wheel = wheels.fetch(PACKAGE, VERSION, cache_dir)
    tmp = cache_dir / (FOLDER + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(WHEEL_FOLDER) and not name.endswith("/"):
                (tmp / name[len(WHEEL_FOLDER):]).write_bytes(archive.read(name))
    if not (tmp / "pytorch_model.bin").exists():
        raise FileNotFoundError(f"{wheel.name} has no {WHEEL_FOLDER}pytorch_model.bin")
    (tmp / ".complete").write_text(VERSION)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


@functools.lru_cache(maxsize=2)
def load_vocab(cache_dir: Path) -> dict[str, int]:
    """Token -> id from the model folder's ``vocab.txt`` (one token a line)."""
    lines = (model_dir(Path(cache_dir)) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {token: index for index, token in enumerate(lines)}


def smiles_tokens(smiles: str) -> list[str]:
    """rxnmapper's tokenization of a (reaction) SMILES; raises if the regex does not cover it all."""
    tokens = SMILES_REGEX.findall(smiles)
    if "".join(tokens) != smiles:
        raise ValueError(f"SMILES not covered by the token regex: {smiles!r}")
    return tokens


def encode(reactions: list[str], vocab: dict[str, int], max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """int64 ``input_ids`` / ``attention_mask`` ``[len(reactions), max_length]``: [CLS] tokens [SEP], then [PAD].

    Raises on a reaction too long or with a token outside ``vocab`` (the data are filtered before).
    """
    ids = np.full((len(reactions), max_length), vocab[PAD], dtype=np.int64)
    for row, reaction in enumerate(reactions):
        tokens = [CLS, *smiles_tokens(reaction), SEP]
        if len(tokens) > max_length or any(t not in vocab for t in tokens):
            raise ValueError(f"reaction {row} too long or with unknown tokens: {reaction!r}")
        ids[row, :len(tokens)] = [vocab[t] for t in tokens]
    return {"input_ids": ids, "attention_mask": (ids != vocab[PAD]).astype(np.int64)}


def mask_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, mask_id: int, special: set[int],
                rate: float = MASK_RATE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``rate`` of each row's maskable tokens (real, not in ``special``; at least one) by ``mask_id``.

    Returns (masked ids, labels): labels hold the original id at the masked positions and -100
    elsewhere (the convention of masked-LM losses). Deterministic given ``seed``.
    """
    rng = np.random.default_rng(seed)
    masked, labels = input_ids.copy(), np.full_like(input_ids, -100)
    for row in range(len(input_ids)):
        candidates = [j for j in np.flatnonzero(attention_mask[row]) if int(input_ids[row, j]) not in special]
        if not candidates:
            continue
        count = max(1, round(rate * len(candidates)))
        chosen = rng.choice(candidates, size=count, replace=False)
        labels[row, chosen] = input_ids[row, chosen]
        masked[row, chosen] = mask_id
    return masked, labels


def group_split(items: list, groups: list, n_calib: int, n_eval: int, seed: int = 0) -> tuple[list, list]:
    """Disjoint (calibration, evaluation) lists of ``items`` such that no group has items in both.

    Groups are taken in a seeded random order; calibration gets whole groups until it holds
    ``n_calib`` items (the last group is cut, its rest dropped), evaluation the next ``n_eval``
    items of later groups. Raises if there are not enough items.
    """
    if len(items) != len(groups):
        raise ValueError("items and groups differ in length")
    members: dict = {}
    for item, group in zip(items, groups):
        members.setdefault(group, []).append(item)
    keys = sorted(members, key=str)
    order = np.random.default_rng(seed).permutation(len(keys))
    calib, evals = [], []
    for index in order:
        group = members[keys[index]]
        if len(calib) < n_calib:
            calib.extend(group[: n_calib - len(calib)])
        elif len(evals) < n_eval:
            evals.extend(group[: n_eval - len(evals)])
    if len(calib) < n_calib or len(evals) < n_eval:
        raise ValueError(f"asked for {n_calib}+{n_eval} items, the groups hold {len(calib)}+{len(evals)}")
    return calib, evals


def scores(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task metric on the masked positions (``labels >= 0``) of logits ``[N, seq, vocab]``:
    top-1 accuracy against the true token, and top-1 agreement with ``reference`` (the fp32 model)."""
    where = labels >= 0
    if reference.shape != candidate.shape or reference.shape[:2] != labels.shape or not where.any():
        raise ValueError(f"need [N, seq, V] logits and [N, seq] labels with a masked position, got "
                         f"{reference.shape}, {candidate.shape}, {labels.shape}")
    top_ref, top_cand = reference.argmax(-1)[where], candidate.argmax(-1)[where]
    return {"accuracy": float(np.mean(top_cand == labels[where])), "agreement": float(np.mean(top_cand == top_ref))}


# Reaction templates applied to the NCI molecules: (name, reaction SMARTS with the NCI molecule as
# the first reactant, partners for the second reactant (empty: one reactant), reagents).
_AMINE = "[N;H2,H1;!$(N=*);!$(N-[C,S]=[O,S,N]);!$(N-[!#6;!#1]);!$(N-C=C);+0:3]"
_AMINES = ("CN", "NCc1ccccc1", "C1CCNCC1", "C1COCCN1", "Nc1ccccc1", "CC(C)N", "NCCO", "CNC")
TEMPLATES = (
    ("amide coupling", "[C:1](=[O:2])[OH]." + _AMINE + ">>[C:1](=[O:2])[N:3]", _AMINES,
     ("CN(C)C=O", "CCN(C(C)C)C(C)C", "CN(C)C(On1nnc2cccnc21)=[N+](C)C.F[P-](F)(F)(F)(F)F")),
    ("acylation", _AMINE + ".[C:1](=[O:2])Cl>>[N:3][C:1]=[O:2]",
     ("CC(=O)Cl", "O=C(Cl)c1ccccc1", "O=C(Cl)C1CC1"), ("CCN(CC)CC", "ClCCl")),
    ("sulfonylation", _AMINE + ".[S:1](=[O:2])(=[O:4])Cl>>[N:3][S:1](=[O:2])=[O:4]",
     ("Cc1ccc(S(=O)(=O)Cl)cc1", "CS(=O)(=O)Cl"), ("c1ccncc1", "ClCCl")),
    ("Boc protection", _AMINE + ".CC(C)(C)OC(=O)OC(=O)OC(C)(C)C>>[N:3]C(=O)OC(C)(C)C",
     ("CC(C)(C)OC(=O)OC(=O)OC(C)(C)C",), ("C1CCOC1", "CCN(CC)CC")),
    ("esterification", "[C:1](=[O:2])[OH].[CH3,CH2;!$(C=*):3][OH:4]>>[C:1](=[O:2])[O:4][C:3]",
     ("CO", "CCO"), ("O=S(=O)(O)O",)),
    ("ester hydrolysis", "[C:1](=[O:2])[O:4][CH3]>>[C:1](=[O:2])[OH1:4]", (), ("[Li+].[OH-]", "C1CCOC1", "O")),
    ("nitro reduction", "[c:1][N+:2](=O)[O-]>>[c:1][NH2+0:2]", (), ("[H][H]", "[Pd]", "CCO")),
    ("Buchwald amination", "[c:1][Br,I]." + _AMINE + ">>[c:1][N:3]", _AMINES,
     ("O=C([O-])[O-].[Cs+].[Cs+]", "Cc1ccccc1")),
    ("Suzuki coupling", "[c:1][Br,I].[c:2]B(O)O>>[c:1]-[c:2]",
     ("OB(O)c1ccccc1", "OB(O)c1ccc(F)cc1", "Cc1ccc(B(O)O)cc1", "OB(O)c1cccnc1"),
     ("O=C([O-])[O-].[Na+].[Na+]", "C1COCCO1", "O")),
    ("O-alkylation", "[c:1][OH1:2].[CH3,CH2;!$(C=*):3][Br,I]>>[c:1][O:2][C:3]",
     ("CI", "BrCc1ccccc1", "CCBr"), ("O=C([O-])[O-].[K+].[K+]", "CC(C)=O")),
    ("reductive amination", "[CH1:1](=O)[#6:2]." + _AMINE + ">>[CH2:1]([#6:2])[N:3]", _AMINES,
     ("CC(=O)O[BH-](OC(C)=O)OC(C)=O.[Na+]", "ClCCl")),
)


def nci_smiles() -> list[str]:
    """The 5000 NCI molecules (SMILES) that RDKit ships in its data folder."""
    from rdkit import RDConfig

    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _canonical(smiles: str) -> str | None:
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def _reaction_smiles(precursors: list[str], product) -> str | None:
    """rxnmapper's form: canonical precursors (reactants and reagents) sorted, ``>>``, canonical product."""
    from rdkit import Chem

    try:
        Chem.SanitizeMol(product)
    except Exception:  # noqa: BLE001 - RDKit raises several kinds for a product it cannot sanitize
        return None
    out = _canonical(Chem.MolToSmiles(product))
    parts = [_canonical(p) for s in precursors for p in s.split(".")]
    if out is None or None in parts:
        return None
    return ".".join(sorted(parts)) + ">>" + out


def _outcome(reaction, mol, smiles: str, partner: str | None, reagents) -> str | None:
    """The reaction SMILES of the first sanitizable product of ``reaction`` on ``mol`` (+ ``partner``)."""
    from rdkit import Chem

    reactants = (mol,) if partner is None else (mol, Chem.MolFromSmiles(partner))
    for products in reaction.RunReactants(reactants, 4):
        if len(products) == 1:
            found = _reaction_smiles([smiles, *([partner] if partner else []), *reagents], products[0])
            if found is not None:
                return found
    return None


def make_reactions(vocab: dict[str, int], max_length: int = MAX_LENGTH, seed: int = 0) -> list[tuple[str, str]]:
    """(reaction SMILES, its NCI substrate) for every template that applies to an NCI molecule, with a
    seeded choice of partner; only reactions that fit ``max_length`` tokens of ``vocab``, deduplicated."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    RDLogger.DisableLog("rdApp.*")
    compiled = [(AllChem.ReactionFromSmarts(smarts), partners, reagents)
                for _, smarts, partners, reagents in TEMPLATES]
    rng, seen, out = np.random.default_rng(seed), set(), []
    for smiles in nci_smiles():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None or mol.GetNumHeavyAtoms() > 40:
            continue
        for reaction, partners, reagents in compiled:
            partner = partners[rng.integers(len(partners))] if partners else None
            found = _outcome(reaction, mol, smiles, partner, reagents)
            tokens = smiles_tokens(found) if found else []
            if found and found not in seen and len(tokens) + 2 <= max_length and all(t in vocab for t in tokens):
                seen.add(found)
                out.append((found, smiles))
    return out


def build_splits(cache_dir: Path, n_calib: int = 256, n_eval: int = 512) -> tuple[Path, Path]:
    """Write ``albert_calib.npz`` (``input_ids``, ``attention_mask``) and ``albert_eval.npz`` (the same
    plus ``labels``), masked reactions split by substrate; reuse them if complete."""
    import rdkit

    cache_dir = Path(cache_dir)
    calib_path, eval_path, meta_path = cache_dir / CALIB_FILE, cache_dir / EVAL_FILE, cache_dir / SPLITS_META
    if _common.cached_metadata(meta_path, [calib_path, eval_path], FORMAT) is not None:
        return calib_path, eval_path
    start = time.perf_counter()
    meta_path.unlink(missing_ok=True)
    vocab = load_vocab(cache_dir)
    pool = make_reactions(vocab)
    calib, evals = group_split([r for r, _ in pool], [s for _, s in pool], n_calib, n_eval)
    special = {vocab[t] for t in (PAD, CLS, SEP)}
    for path, reactions, seed in ((calib_path, calib, 1), (eval_path, evals, 2)):
        feeds = encode(reactions, vocab)
        ids, labels = mask_tokens(feeds["input_ids"], feeds["attention_mask"], vocab[MASK], special, seed=seed)
        extra = {"labels": labels} if path == eval_path else {}
        _common.write_npz(path, input_ids=ids, attention_mask=feeds["attention_mask"], **extra)
    _common.write_json(meta_path, {
        "complete": True, "format": FORMAT, "rdkit": rdkit.__version__, "pool_reactions": len(pool),
        "pool_substrates": len({s for _, s in pool}), "templates": [t[0] for t in TEMPLATES],
        "max_length": MAX_LENGTH, "mask_rate": MASK_RATE, "n_calib": len(calib), "n_eval": len(evals),
        "calib_reactions": calib, "eval_reactions": evals,
        "build_seconds": round(time.perf_counter() - start, 3), "files": _common.file_sizes([calib_path, eval_path]),
    })
    return calib_path, eval_path


def load_eval(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(feeds, labels) of ``albert_eval.npz``: the model inputs, and the true ids at masked positions."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in ("input_ids", "attention_mask")}, data["labels"]


def load_model(cache_dir: Path):
    """``AlbertForMaskedLM`` wrapped to map (input_ids, attention_mask) to logits, eval mode, eager attention."""
    import torch

    from .minilm import _transformers

    masked_lm = _transformers().AlbertForMaskedLM.from_pretrained(
        str(model_dir(cache_dir)), local_files_only=True, attn_implementation="eager")

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits(masked_lm).eval()  # eval on the wrapper: the exporter restores the wrapper's mode


def _export(module, example: dict[str, np.ndarray], path: Path) -> list[str]:
    """torch.onnx.export (classic exporter, opset 17, constant folding) to ``path``; return the warnings."""
    import warnings

    import torch

    if example["attention_mask"].all():
        raise ValueError("the export example must contain padded positions")
    seq = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(module, tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask")),
                          str(path), input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": seq, "attention_mask": seq, "logits": seq},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught})


def _drop_weight_identities(model) -> int:
    """Make every node read the shared weights directly: the exporter gives layers 2-12 their weights
    through ``Identity`` nodes on the one initializer (66 of them), which hides from quantizers that
    those MatMuls have constant weights. Exact (ORT removes them at load anyway); returns the count."""
    inits = {t.name for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    outputs = {o.name for o in model.graph.output}
    alias = {k: v for k, v in alias.items() if k not in outputs}
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(alias)


def _check(model, module, session, feeds: dict[str, np.ndarray]) -> dict:
    """Structure (weight MatMuls, shared weights) and torch/ORT agreement on the real tokens of
    ``feeds``, padded to 128 and cut to the longest reaction; raise if they differ by ``MAX_ABS_DIFF``."""
    import torch

    from .minilm import weight_matmuls

    matmuls = weight_matmuls(model)
    shared = Counter(n.input[1] for n in matmuls)
    if len(matmuls) != WEIGHT_MATMULS or len(shared) != WEIGHTS:
        raise RuntimeError(f"expected {WEIGHT_MATMULS} weight MatMuls on {WEIGHTS} weights, got "
                           f"{len(matmuls)} on {len(shared)}")
    worst = 0.0
    longest = int(feeds["attention_mask"].sum(1).max())
    for cut in (feeds, {k: v[:, :longest] for k, v in feeds.items()}):
        with torch.no_grad():
            ref = module(torch.from_numpy(cut["input_ids"]), torch.from_numpy(cut["attention_mask"])).numpy()
        real = cut["attention_mask"].astype(bool)  # padded positions' logits are unused and may differ
        worst = max(worst, float(np.abs(_common.run_batched(session, cut, 8) - ref)[real].max()))
    if not worst < MAX_ABS_DIFF:
        raise RuntimeError(f"ORT and torch logits differ by {worst:.3g} (limit {MAX_ABS_DIFF})")
    return {"nodes": len(model.graph.node), "weight_matmuls": len(matmuls), "weight_initializers": len(shared),
            "matmuls_per_weight": dict(sorted(Counter(shared.values()).items())),
            "op_counts": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
            "onnx_parameters": int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == 1)),
            "torch_ort_max_abs_diff": worst}


def build(cache_dir: Path) -> Path:
    """Fetch, export, verify and cache ``albert.onnx`` (+ ``albert.json``); return the model path.

    A complete earlier build in ``cache_dir`` is returned as is.
    """
    import onnx
    import onnxruntime
    import torch

    cache_dir = Path(cache_dir)
    model_path, meta_path = cache_dir / MODEL_FILE, cache_dir / META_FILE
    if _common.cached_metadata(meta_path, [model_path], FORMAT) is not None:
        return model_path
    start = time.perf_counter()
    meta_path.unlink(missing_ok=True)
    torch.manual_seed(0)
    module = load_model(cache_dir)
    eval_path = build_splits(cache_dir)[1]
    example = {k: v[:2, :24] for k, v in load_eval(eval_path)[0].items()}
    example["attention_mask"][0, 20:] = 0  # a padded row, so the mask is not traced as all ones
    with _common.atomic_path(model_path) as tmp:
        caught = _export(module, example, tmp)
        model = onnx.load(str(tmp))
        identities = _drop_weight_identities(model)
        model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = VOCAB
        onnx.save(model, str(tmp))
        onnx.checker.check_model(model, full_check=True)
        feeds = {k: v[:8] for k, v in load_eval(eval_path)[0].items()}
        checked = _check(model, module, _common.ort_session(tmp), feeds)
    _common.write_json(meta_path, {
        "complete": True, "format": FORMAT, "source_package": PACKAGE, "source_version": VERSION,
        "source_folder": WHEEL_FOLDER, "opset": OPSET, "exporter": "torch.onnx.export(dynamo=False) (TorchScript)",
        "attn_implementation": "eager", "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
        "outputs": {"logits": ["batch", "sequence", VOCAB]},
        "torch_parameters": int(sum(p.numel() for p in module.parameters())), **checked, "weight_identities_dropped": identities,
        "export_warnings": caught,
        "build_seconds": round(time.perf_counter() - start, 3), "files": _common.file_sizes([model_path]),
    })
    return model_path
