"""Record transcripts/demo.jsonl: the session `booth demo` replays.

The assistant turns are scripted (no LLM is needed to make the file), but everything else is
the real thing: the same Session loop, tool validation, approvals and transcript writer as
`booth chat`, with the tools really run on the tiny model. Run it again after changing a
tool's result format, so that the demo's replay still matches:

    python scripts/record_demo.py

It records with the booth of the tree it lives in (its repository goes first on sys.path),
so that a checkout never writes its demo with another installed or checked-out booth.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
# ruff: noqa: E402 (booth is imported below, once its repository is first on the path)

from booth.agent.approval import AutoApprove
from booth.agent.loop import Session
from booth.agent.model import AssistantTurn, ScriptedModel, ToolCall
from booth.agent.prompt import build_system_prompt
from booth.agent.replay import session_places
from booth.agent.transcript import TranscriptWriter, make_header
from booth.demo import enter, prepare_demo_folder, shipped_transcript
from booth.tools import TOOLS, ToolContext

GOAL = "Teach the model my dog Rex from the photos in photos/rex, then show him as an astronaut."


def turn(text: str, name: str | None = None, arguments: dict | str | None = None,
         call_id: str = "") -> AssistantTurn:
    calls = []
    if name:
        raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
        calls.append(ToolCall(call_id, name, raw))
    return AssistantTurn(text, calls, "tool_calls" if calls else "stop")


SCRIPT = [
    turn("I'll start by preparing Rex's photos at the demo model's 64 px resolution.",
         "prepare_dataset",
         {"images_dir": "photos/rex", "class_noun": "dog", "resolution": 64, "name": "rex"},
         "Prep0Rex1"),
    turn("5 photos kept; a note and a duplicate were rejected. Next, class images of ordinary "
         "dogs, so the model keeps its idea of a dog while it learns Rex.",
         "generate_priors",
         {"class_prompt": "a photo of a dog", "num_images": 6, "resolution": 64,
          "num_inference_steps": 8, "batch_size": 3},
         "Priors001"),
    # A realistic slip: a field the tool does not have. booth refuses it before anything
    # runs and tells the model, which corrects itself on the next turn.
    turn("Now the DreamBooth training with prior preservation.", "train",
         {"dataset": "rex", "steps": 60}, "TrainBad1"),
    turn("Sorry, the field is max_train_steps. Training again with the right arguments.",
         "train",
         {"dataset": "rex", "max_train_steps": 60, "learning_rate": 1e-4,
          "checkpointing_steps": 20, "resolution": 64, "run_name": "rex-demo"},
         "TrainRex1"),
    turn("Training finished. Let me render Rex as an astronaut.", "sample",
         {"prompts": ["a photo of sks dog as an astronaut on the moon"], "run": "rex-demo",
          "num_images_per_prompt": 4, "num_inference_steps": 12, "seed": 0},
         "SampleRx1"),
    turn("Done: Rex was learned as \"sks dog\" and the four astronaut pictures are in the "
         "samples folder listed above, with their scores. Ask for other scenes, or to compare "
         "the checkpoints if these look overfitted."),
]


def main() -> int:
    target = shipped_transcript()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, workspace = prepare_demo_folder(Path(tmp))
        enter(Path(tmp))
        ctx = ToolContext.from_options(workspace=str(workspace), base_model=str(model_dir))
        system_prompt = build_system_prompt(ctx)
        header = make_header(
            model="scripted demo (no LLM)", endpoint="none: scripts/record_demo.py",
            sampling={}, tools=[t.openai_spec() for t in TOOLS.values()],
            system_prompt=system_prompt, **session_places(ctx),
        )
        target.unlink(missing_ok=True)
        writer = TranscriptWriter.create(target, header)
        session = Session(ScriptedModel(SCRIPT), ctx, AutoApprove(), system_prompt=system_prompt,
                          transcript=writer)
        ok = session.send(GOAL)
        writer.close()
    print(f"wrote {target}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
