from .cli import main
from .distributed import exit_program

exit_program(main())
