"""Regenerate kit_scores.json: the AI Challenger 2017 caption kit's own scores on a prediction set made here.

The kit (github.com/AIChallenger/AI_Challenger_2017, `Evaluation/caption_eval`, Python 2) is not part of this
project; check it out beside it and point --kit at its `Evaluation/caption_eval` dir. It runs under Python 3 with
import-time shims only, its code unchanged:
- its modules are compiled through lib2to3's fixers (FIXERS) when imported (Python 2 syntax);
- `reload(sys); sys.setdefaultencoding(...)` become no-ops; matplotlib/skimage (drawing helpers the scoring path
  never calls) are empty stand-ins;
- the subprocess pipes of its PTB tokenizer and METEOR wrappers are text mode, line-buffered UTF-8 (Python 2 str
  pipes); the tokenizer's temp file is opened in text mode;
- the two jars (stanford-corenlp-3.4.1.jar, meteor-1.5.jar + data/paraphrase-en.gz) are taken from the installed
  pycocoevalcap when the checkout lacks them (same releases; git LFS-less checkouts have empty placeholders).
The reference json is built the way the kit expects it (COCO captions format, `file_name` = image id, captions
already segmented with the kit's own `jieba.cut(caption.strip().replace("。", ""))`).

Usage: python tests/reference/aic_icc_kit/regenerate.py --kit /path/to/AI_Challenger_2017/Evaluation/caption_eval
"""

from __future__ import annotations

import argparse
import builtins
import importlib.abc
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXERS = ("print", "xrange", "dict", "has_key", "import", "tuple_params", "except", "raise", "unicode", "basestring",
          "map", "filter", "zip", "ne")

PREDICTIONS = {
    "a1.jpg": "两个人在绿油油的草地上骑马。",
    "b2.jpg": "一个穿着T恤的男人，在街道上行走！",
    "c3.jpg": "一只小狗在草地 上奔跑？",
    "d4.jpg": "厨房里有一个女人在做饭",
    "e5.jpg": "一群孩子在海边玩耍，天空很蓝。",
    "f6.jpg": "一个戴着帽子的人站在 iPhone 广告牌前",
}
REFERENCES = {
    "a1.jpg": ["两个面带微笑的人在草地上骑马。", "草地上有两个人在骑马", "两个人骑着马走在绿色的草地上。",
               "绿油油的草地上有两个人骑着马。", "两个 人 在 草地 上 骑 马"],
    "b2.jpg": ["一个穿着白色T恤的男人走在街上。", "街道上有一个男人在行走，", "一个男人在马路上走着！",
               "一个穿短袖的男人在街道上走路", "街上一个男人穿着T恤在走路。"],
    "c3.jpg": ["一只小狗在草地上奔跑。", "草地上有一只狗在跑？", "一条小狗在绿色的草地上跑着",
               "一只可爱的小狗在草坪上奔跑。", "小狗在草地上快乐地奔跑！"],
    "d4.jpg": ["一个女人在厨房里做饭。", "厨房里的女人正在炒菜", "一位妇女在厨房里烹饪食物。",
               "一个女人站在灶台前做饭", "厨房里有一个正在做饭的女人。"],
    "e5.jpg": ["一群孩子在海边玩耍。", "海滩上有几个小孩在玩，天很蓝", "一群小朋友在沙滩上嬉戏。",
               "几个孩子在蓝天下的海边玩耍", "海边有一群正在玩耍的孩子。"],
    "f6.jpg": ["一个戴帽子的人站在广告牌前。", "广告牌前站着一个戴着帽子的人", "一个人站在手机广告前面",
               "一个戴着帽子的男人站在iPhone广告前", "一个人戴着帽子站在广告牌的前面。"],
}


class Py2Loader(importlib.abc.SourceLoader):
    """Compiles a kit module after lib2to3's FIXERS (Python 2 syntax → 3)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def get_filename(self, fullname: str) -> str:
        return self.path

    def get_data(self, path: str) -> bytes:
        from lib2to3.refactor import RefactoringTool

        source = Path(path).read_text(encoding="utf-8")
        tool = RefactoringTool([f"lib2to3.fixes.fix_{n}" for n in FIXERS])
        return str(tool.refactor_string(source + "\n", path)).encode("utf-8")


class KitFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        parts = fullname.split(".")
        for base in (self.root, self.root / "coco_caption" / "pycxevalcap"):
            candidate = base.joinpath(*parts)
            for file in (candidate / "__init__.py", candidate.with_suffix(".py")):
                if file.is_file():
                    package = file.name == "__init__.py"
                    return importlib.util.spec_from_file_location(
                        fullname, file, loader=Py2Loader(str(file)),
                        submodule_search_locations=[str(candidate)] if package else None)
        return None


def text_popen(*args, **kwargs):  # noqa: ANN002, ANN003 - wraps subprocess.Popen
    kwargs.update(universal_newlines=True, bufsize=1, encoding="utf-8")
    return subprocess.Popen(*args, **kwargs)


def install_shims(kit: Path) -> None:
    builtins.reload = lambda module: module  # type: ignore[attr-defined]
    sys.setdefaultencoding = lambda encoding: None  # type: ignore[attr-defined]
    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.collections", "matplotlib.patches", "skimage",
                 "skimage.draw"):
        stub = types.ModuleType(name)
        stub.PatchCollection = stub.Polygon = stub.polygon = None  # type: ignore[attr-defined]
        sys.modules[name] = stub
    import pycocoevalcap

    installed = Path(list(pycocoevalcap.__path__)[0])
    for relative in ("tokenizer/stanford-corenlp-3.4.1.jar", "meteor/meteor-1.5.jar", "meteor/data/paraphrase-en.gz"):
        target = kit / "coco_caption" / "pycxevalcap" / relative
        if not target.is_file() or target.stat().st_size == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(installed / relative, target)
    sys.meta_path.insert(0, KitFinder(kit))


def kit_score(predictions: dict[str, str], references: dict[str, list[str]], workdir: Path) -> dict:
    """What the kit's compute_m1 computes: its COCO/loadRes/COCOEvalCap path, with its error flag."""
    import jieba

    from coco_caption.pycxevalcap.eval import COCOEvalCap
    from coco_caption.pycxtools.coco import COCO
    import coco_caption.pycxevalcap.meteor.meteor as meteor
    import coco_caption.pycxevalcap.tokenizer.ptbtokenizer as ptb

    ptb.subprocess = types.SimpleNamespace(Popen=text_popen, PIPE=subprocess.PIPE)
    ptb.tempfile = types.SimpleNamespace(NamedTemporaryFile=lambda **kw: tempfile.NamedTemporaryFile(
        mode="w", encoding="utf-8", **kw))
    meteor.subprocess = types.SimpleNamespace(Popen=text_popen, PIPE=subprocess.PIPE)
    images = [{"file_name": k, "id": n} for n, k in enumerate(references)]
    annotations = [{"image_id": n, "id": len(references) * 10 + n * 10 + j,
                    "caption": " ".join(jieba.cut(c.strip().replace("。", ""), cut_all=False))}
                   for n, k in enumerate(references) for j, c in enumerate(references[k])]
    ref_file, sub_file = workdir / "ref.json", workdir / "submit.json"
    ref_file.write_text(json.dumps({"annotations": annotations, "images": images, "type": "captions", "info": {},
                                    "licenses": []}, ensure_ascii=False), encoding="utf-8")
    sub_file.write_text(json.dumps([{"image_id": k, "caption": v} for k, v in predictions.items()],
                                   ensure_ascii=False), encoding="utf-8")
    result = {"error": 0}
    try:
        coco = COCO(str(ref_file))
        evaluator = COCOEvalCap(coco, coco.loadRes(str(sub_file)))
        evaluator.evaluate()
    except Exception as exc:  # noqa: BLE001 - the kit's compute_m1 maps any failure to error 1
        result["error"], result["exception"] = 1, f"{type(exc).__name__}: {exc}"
    else:
        result.update({k: float(v) for k, v in evaluator.eval.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kit", required=True, type=Path, help="AI_Challenger_2017/Evaluation/caption_eval")
    parser.add_argument("--out", type=Path, default=HERE / "kit_scores.json")
    args = parser.parse_args()
    install_shims(args.kit.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        scores = kit_score(PREDICTIONS, REFERENCES, Path(tmp))
        with_empty = kit_score({**PREDICTIONS, "c3.jpg": ""}, REFERENCES, Path(tmp))
    record = {"kit": "AIChallenger/AI_Challenger_2017 Evaluation/caption_eval (run_evaluations.compute_m1 path)",
              "predictions": PREDICTIONS, "references": REFERENCES, "kit_scores": scores,
              "kit_with_an_empty_prediction": with_empty}
    args.out.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(scores, indent=1), with_empty)


if __name__ == "__main__":
    main()
