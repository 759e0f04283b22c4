"""The parity fixtures are the repository's own, byte-identical copies (tests/fixtures/README.md), and nothing in
the repository reads a folder outside the checkout at test time, so a plain clone passes its tests."""
import hashlib
import re

from conftest import FIXTURES, ROOT

# sha256 of every fixture file, as the original code wrote it. A change here is never a fix: see the README there.
SHA256 = {
    "expected.json": "d27809483e67ab244b414ff27f0475f852136c73e53f4f53d400ee52e21f7a83",
    "expected.safetensors": "0c75764e79f823e052e2c23de9f290aff2273bbd82c1823a79efdb557538b331",
    "inputs.json": "051657924e95559c854434b5d0e941b110100bc040983613acc0aa3afaedea8b",
    "inputs/reward_image.png": "3dbc3f565443fdc9605ab52776a1102d12e6bfac28533a03e86466bd43d29af7",
    "llava/added_tokens.json": "e7f1206aad1018177ab475bd93f2ea3e70a32b7be1252299d735fea8ce9667fb",
    "llava/config.json": "3dc2ac505fb8dbf6d41022458d810bab005ab98265c9ef14697bba9f3934a222",
    "llava/generation_config.json": "06822f418f9e63fd4507e575ed0e2accd5706e94705af003798015075cf8faed",
    "llava/merges.txt": "9d61de461e665d68e2ba9fb819b072ed54937459de7be5962e12a4ad119eb509",
    "llava/model.safetensors": "917fa0b305fb8b4ca3f7730c1995cd1a04b3272a4f9b7acb4a6c9d1300b72414",
    "llava/special_tokens_map.json": "f4f79e08d97f4d1c87f8d89264f525c8789da3b73b3bb55d1e12f692f41a7b1b",
    "llava/tokenizer.json": "4740894ee2cf87d24ef34aff2a3499bac0dc98c53caa96ca8a02ed392d633b12",
    "llava/tokenizer_config.json": "282fad72d8621ec21a52020214413b19a2ace7d55fd7a0d6eb11e924ab717752",
    "llava/vision_tower/config.json": "893875b91d89a17f2d4ef24107026f17fa4cdcf3a6cdf74187d7a7b18a759457",
    "llava/vocab.json": "7ef9dd6fc98a2bc55b7dca629408e34a922f9a439d54143e0004f740ac339812",
    "magvitv2/config.json": "0fcc1f2faa009e34ec97ef1680b16859485a9478e07bbce7e7dbab66da2ddf52",
    "magvitv2/model.safetensors": "7e2bdaf9f493a42e803346b1caebf0fc1a5482d3f70b018c17037121b8e41f0c",
    "phi/added_tokens.json": "f65b633463c108f77dc386c58080a787191e5af3da3efaaf52f15b473e0fbd8c",
    "phi/config.json": "e0a9cac71e3855e36d52b99cad684acc90d6cb8c12e9683df126543e5c4b34a1",
    "phi/merges.txt": "2015f02e9e17f330308e5f41e7369ab15603c3ec7915e9a96b796c4a0c06a90c",
    "phi/special_tokens_map.json": "6f50ab5a5a509a1c309d6171f339b196a900dc9c99ad0408ff23bb615fdae7ad",
    "phi/tokenizer.json": "507cc65b1db30900a7c55b22837c420f42802be8fca7c1a75ba59c063dcdca22",
    "phi/tokenizer_config.json": "2848c48f0983bb45fabbcf01fa427357e069d1b759b65ac8998b89b6b7884063",
    "phi/vocab.json": "bdd3e97a34d9ec591d92e483b7f6171630ad1289cb15c0172dea4ca222adfaa6",
    "showo/config.json": "ac83f504786c54a8521af10f19ffd36f7d334070d2ec171863d8e5746f65ce6d",
    "showo/inference_config.yaml": "ef5e1b28707e3e513b5a24d62478fd02c2130e07116bafc6f7a79167569127af",
    "showo/model.safetensors": "f7d8d3441247225bfed44419cfcf267effd5962a6ff40e4f9c8e732ec3871048",
    "showo/tokenizer/added_tokens.json": "c54ad5d8ab317990170ff500fc1feef27d09d7a3eb0f498c2e47d347972202f6",
    "showo/tokenizer/merges.txt": "2015f02e9e17f330308e5f41e7369ab15603c3ec7915e9a96b796c4a0c06a90c",
    "showo/tokenizer/special_tokens_map.json": "beabe545699b28b332bae50ea5189a0efda78940587278157f5835928eb3d9a3",
    "showo/tokenizer/tokenizer.json": "6df677532eb8aedcfe93b631e4be6ad01ab38bfb60ad2698cf693504de424c0d",
    "showo/tokenizer/tokenizer_config.json": "57a53c140169984e4b79c7eb58adcb23948a1aa0d5608402f240bd2bd3616741",
    "showo/tokenizer/vocab.json": "bdd3e97a34d9ec591d92e483b7f6171630ad1289cb15c0172dea4ca222adfaa6",
}
DOCS = {"README.md", ".gitattributes"}  # ours, not reference data


def test_every_fixture_file_is_byte_identical_to_the_reference():
    found = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()} - DOCS
    assert found == set(SHA256), f"missing {sorted(set(SHA256) - found)}, unexpected {sorted(found - set(SHA256))}"
    changed = [p for p, h in SHA256.items() if hashlib.sha256((FIXTURES / p).read_bytes()).hexdigest() != h]
    assert not changed, f"fixture files differ from the reference: {changed}"


# The old layout read the fixtures from a shared/ folder beside the checkout, located by an environment variable;
# the pattern is assembled from pieces so that this file does not match itself.
OUTSIDE = re.compile(r"\.\./" + "shared" + r"|parent\s*/\s*[\"']" + "shared" + r"[\"']|COTGEN_" + "SHARED")


def test_nothing_reads_a_folder_beside_the_checkout():
    # the product, its tests, CI and docs; not run outputs (runs/, outputs/) nor the reference data itself
    candidates = [*ROOT.glob("*"), *(ROOT / ".ci").glob("*"), *(ROOT / "docs").glob("*"), *(ROOT / "tests").glob("*")]
    files = [p for p in candidates if p.is_file() and p.suffix in {".py", ".md", ".txt", ".yaml", ".toml", ""}]
    assert len(files) > 10, files
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, f"these lines read the shared folder outside the repository: {hits}"
