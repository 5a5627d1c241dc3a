"""Timestep samplers: which t each training sample is noised to.

Each sampler draws t (B,) from a distribution p over 0..T-1 and returns the importance weights
1 / (T p_t) beside it. The reference loss does not use the weights; they are returned for extensions.
"""
import numpy as np
import torch

SAMPLERS = ('uniform', 'lossaware', 'fixstep')


class ScheduleSampler:
    """Base class: subclasses define weights(), an unnormalised distribution over the T steps."""

    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps

    def weights(self):
        raise NotImplementedError

    def sample(self, batch_size, device, generator=None):
        """Draw t (B,) long and the importance weights 1 / (T p_t) (B,) float32 on `device`."""
        w = self.weights()
        if np.all(w == w[0]):  # uniform: no host-to-device copy, no multinomial
            t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
            return t, torch.ones(batch_size, device=device)
        p = torch.tensor(w / w.sum(), dtype=torch.float32, device=device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, 1.0 / (self.num_timesteps * p[t])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class UniformSampler(ScheduleSampler):
    def weights(self):
        return np.ones(self.num_timesteps, dtype=np.float64)


class FixSampler(ScheduleSampler):
    """Weight 1 on the first half of the steps and 0.5 on the rest (the first ceil(T/2) when T is odd)."""

    def weights(self):
        first = self.num_timesteps - self.num_timesteps // 2
        return np.concatenate([np.ones(first), np.full(self.num_timesteps // 2, 0.5)])


class LossSecondMomentResampler(ScheduleSampler):
    """Samples t in proportion to sqrt(E[loss_t^2]) over the last `history` losses of each step,
    mixed with `uniform_prob` of the uniform distribution; uniform until every step has `history` losses.

    The reference never calls update_with_all_losses, so it always samples uniformly; the trainer calls it
    only with --update_lossaware.
    """

    def __init__(self, num_timesteps, history=10, uniform_prob=0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_timesteps, history), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self):
        return bool((self.loss_counts == self.history).all())

    def weights(self):
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w /= w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(self, ts, losses):
        """Record per-sample losses (sequences of equal length) at their timesteps, oldest first out."""
        for t, loss in zip(np.asarray(ts, dtype=np.int64), np.asarray(losses, dtype=np.float64)):
            if self.loss_counts[t] == self.history:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self):
        return {'loss_history': torch.from_numpy(self.loss_history.copy()),
                'loss_counts': torch.from_numpy(self.loss_counts.copy())}

    def load_state_dict(self, state):
        self.loss_history = state['loss_history'].numpy().astype(np.float64).copy()
        self.loss_counts = state['loss_counts'].numpy().astype(np.int64).copy()


def create_named_schedule_sampler(name, num_timesteps):
    if name == 'uniform':
        return UniformSampler(num_timesteps)
    if name == 'lossaware':
        return LossSecondMomentResampler(num_timesteps)
    if name == 'fixstep':
        return FixSampler(num_timesteps)
    raise ValueError(f'unknown schedule_sampler_name {name!r}; choose one of {", ".join(SAMPLERS)}')
