"""TensorBoard scalars of a run (--tensorboard DIR), global step = the epoch (0-based, as in the log).

After every epoch: train/loss (the epoch's mean), train/lr (the rate it trained with), train/seconds.
After every validation: valid/<metric> for each HR@K and NDCG@K (percent) and valid/seconds.
The tensorboard package is optional: require_tensorboard() turns its absence into one error line.
"""

MISSING = '--tensorboard needs the tensorboard package: pip install tensorboard'


def require_tensorboard():
    """torch's SummaryWriter class; ValueError (one line naming the fix) without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(MISSING) from None
    return SummaryWriter


class Board:
    """One run's event file in log_dir.

    purge_step: None for a new run; for a resumed one, the first epoch whose training it will log. TensorBoard
    then hides the points at that step and after from the earlier files (written after the checkpoint this run
    resumes from, and written again here), so each epoch appears once.
    """

    def __init__(self, log_dir, purge_step=None):
        self.writer = require_tensorboard()(log_dir, purge_step=purge_step)

    def epoch(self, epoch, loss, lr, seconds):
        self.writer.add_scalar('train/loss', loss, epoch)
        self.writer.add_scalar('train/lr', lr, epoch)
        self.writer.add_scalar('train/seconds', seconds, epoch)

    def validation(self, epoch, metrics, seconds):
        for name, value in metrics.items():
            self.writer.add_scalar(f'valid/{name}', value, epoch)
        self.writer.add_scalar('valid/seconds', seconds, epoch)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def open_board(log_dir, purge_step, log):
    """The run's Board in log_dir, said in the log. purge_step: None for a new run; for a resumed one, the first
    epoch its checkpoint has not trained (TensorBoard hides what an earlier process logged from there on)."""
    board = Board(log_dir, purge_step=purge_step)
    log(f'TensorBoard scalars written to {log_dir}')
    return board
