from kedit_vfl.cli import main

if __name__ == "__main__":
    main()
