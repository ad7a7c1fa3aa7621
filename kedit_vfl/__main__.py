from kedit_vfl.launch import main

if __name__ == "__main__":
    main()
