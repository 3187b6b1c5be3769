"""A reward with variance for an untrained model, so GRPO/DAPO groups carry gradients.

End-to-end tests check mechanics (masks, checkpoints, resume, dynamic sampling), not
learning: a random tiny model never finds the needle, so the task reward would be 0 for
every sample. This one pays for an even-length response on odd-indexed prompts, and 0
on even-indexed prompts, so about half the groups have no signal and DAPO's dynamic
sampling must drop them and generate more.
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    index = int((extra_info or {}).get("index", 1))
    score = 1.0 if index % 2 == 1 and len(solution_str) % 2 == 0 else 0.0
    return {"score": score, "acc": score}
