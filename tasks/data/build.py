"""Derive the task data files from the reference data beside them (rerun to rebuild; output is deterministic).

- past_tense.json: fv_present-past.json with a `group` column, regular or irregular (by the spelling rules of
  the regular past: +ed, +d after e, y -> ied, doubled final consonant + ed).
- uppercase.json: the lower-case words of fv_capitalize.json, each with its upper-cased form.
Both sources: repository ericwtodd/function_vectors, MIT (LICENSE.function_vectors).
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
VOWELS = set("aeiou")


def regular_past(verb: str) -> set[str]:
    forms = {verb + "ed", verb + "d" if verb.endswith("e") else verb + "ed", verb + verb[-1] + "ed",
             verb + "ked" if verb.endswith("c") else verb + "ed"}
    if verb.endswith("y") and verb[-2:-1] not in VOWELS:
        forms.add(verb[:-1] + "ied")
    return forms


def main():
    past = json.loads((HERE / "fv_present-past.json").read_text())
    rows = [{"input": r["input"], "output": r["output"],
             "group": "regular" if r["output"] in regular_past(r["input"]) else "irregular"} for r in past]
    (HERE / "past_tense.json").write_text(json.dumps(rows, indent=0) + "\n")
    words = json.loads((HERE / "fv_capitalize.json").read_text())
    rows = [{"input": r["input"], "output": r["input"].upper()} for r in words
            if r["input"].isalpha() and r["input"].islower()]
    (HERE / "uppercase.json").write_text(json.dumps(rows, indent=0) + "\n")


if __name__ == "__main__":
    main()
