"""Token ids of captions by ComfyUI's own Z-Image tokenizer, after SDClipModel's attention mask (the reference side
of test_encoder_parity.py's tokenizer test). Run with ComfyUI's Python from the ComfyUI folder:

    python comfy_tokenize.py <captions.json> <out.json>
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def main(captions_path: str, out_path: str) -> None:
    from comfy.cli_args import args

    args.cpu = True
    from comfy.text_encoders.z_image import ZImageTokenizer

    with tempfile.TemporaryDirectory() as embeddings:
        tokenizer = ZImageTokenizer(embedding_directory=[embeddings])  # as CLIPLoader builds it
        pad = tokenizer.qwen3_4b.pad_token
        result = []
        for caption in json.load(open(captions_path, encoding="utf-8")):
            ids = [token for batch in tokenizer.tokenize_with_weights(caption)["qwen3_4b"] for token, _ in batch]
            result.append(ids[: ids.index(pad)] if pad in ids else ids)  # the mask ends at the first pad token
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(result, out)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # run from the ComfyUI folder
    main(sys.argv[1], sys.argv[2])
