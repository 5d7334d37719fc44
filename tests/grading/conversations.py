"""Conversation items for grading tests, imported the way a researcher uploads them."""

import json

from grading.services import campaign_import

SYSTEM = {"role": "system", "content": "You answer in one sentence."}
FIRST = {"role": "user", "content": "Name a **prime** number. <script>window.__xss=1</script>"}
REPLY = {"role": "assistant", "content": "Seven is prime."}


def turn_two(i: int) -> dict:
    return {"role": "user", "content": f"Now an even one, please (conversation {i})."}


def upload_conversations(campaign, n: int) -> list[list[dict]]:
    """``n`` items graded on the user's second turn; returns each item's messages up to it."""
    conversations = [[SYSTEM, FIRST, REPLY, turn_two(i)] for i in range(n)]
    if campaign.task_kind.responses == 2:
        rows = [
            {
                "messages": m,
                "response_a": f"Two ({i}).",
                "response_b": f"Four ({i}).",
                "model_a": "secret-model-x",
                "model_b": "secret-model-y",
            }  # fmt: skip
            for i, m in enumerate(conversations)
        ]
    else:
        rows = [
            {"messages": m, "response": f"Two ({i}).", "model": "secret-model-x"}
            for i, m in enumerate(conversations)
        ]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    assert campaign_import(campaign=campaign, data=data, filename="chats.jsonl") == n
    return conversations
