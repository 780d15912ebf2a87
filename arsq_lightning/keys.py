"""The TensorDict keys of the project, spelled once (TorchRL's layout for transitions).

A transition row holds ``OBSERVATION`` and ``ACTION`` and, under ``NEXT``, the next step's observation, reward and
end flags; dataset rows add ``EPISODE`` (the episode id) and ``DEMO`` (the demo flag). Pixel observations are nested:
``(OBSERVATION, PIXELS)`` ``[V, C, H, W]`` and ``(OBSERVATION, PROPRIO)``.
"""

OBSERVATION = "observation"
ACTION = "action"
REWARD = "reward"
TERMINATED = "terminated"  # the episode ended by the task: no bootstrapping
TRUNCATED = "truncated"  # the episode was cut by a time limit: bootstrapping continues
DONE = "done"  # terminated or truncated
SUCCESS = "success"  # the env's success flag, where it reports one
EPISODE_REWARD = "episode_reward"  # TorchRL's RewardSum: the running return of the episode
NEXT = "next"
EPISODE = "episode"
DEMO = "demo"
PIXELS = "pixels"
PROPRIO = "proprio"
STEPS_TO_NEXT = "steps_to_next_obs"  # n-step rows: steps from the observation to ("next", "observation")
NSTEP_REWARDS = "nstep_rewards"  # n-step rows: [n] rewards of those steps, zero after them

NEXT_OBSERVATION = (NEXT, OBSERVATION)
NEXT_REWARD = (NEXT, REWARD)
NEXT_TERMINATED = (NEXT, TERMINATED)
NEXT_TRUNCATED = (NEXT, TRUNCATED)
NEXT_DONE = (NEXT, DONE)
NEXT_SUCCESS = (NEXT, SUCCESS)
NEXT_EPISODE_REWARD = (NEXT, EPISODE_REWARD)
